"""Sampling parameters through the official `openai` client against the server (engine thread, and once
through the engine process), streamed and not: logprobs and top_logprobs (chat) and logprobs=N with
echo (completions) against the engine and a float64 oracle; n choices, seeded and computed from one
prefill; a list of prompts; penalties, logit_bias, min_tokens, stop_token_ids; the checkpoint's
generation_config.json defaults; invalid values answered 400 naming the field."""
import json
import math
import random

import pytest

openai = pytest.importorskip("openai", reason="needs the test extra: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install -e '.[serve]'")

from dsv3 import LLM  # noqa: E402
from dsv3.core.sampling import choice_seed  # noqa: E402
from dsv3.core.tokenizer import Tokenizer  # noqa: E402
from dsv3.serve.app import ServedModel, ServeOptions  # noqa: E402
from dsv3.serve.server import ServerThread  # noqa: E402

from helpers import make_checkpoint, random_prompts, tiny_config  # noqa: E402

MODEL = "tiny-dsv3"
CHAT = [{"role": "user", "content": "hello world"}]
# what the checkpoint recommends: top_k 1 makes an unset request deterministic, whatever its seed
GENERATION_CONFIG = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 1}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("ss") / "tiny", tiny_config(), seed=21, std=0.3)
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return path


def build_tiny(path: str):
    """The engine's model (also run in the engine process, which imports this module by name)."""
    import torch
    torch.set_num_threads(1)
    return LLM(path, backend="cpu", **{"kv_cache.block_size": 16})


@pytest.fixture(scope="module")
def server(ckpt):
    llm = build_tiny(str(ckpt))
    with ServerThread(llm, ServeOptions(MODEL)) as s:
        s.llm = llm
        yield s


@pytest.fixture(scope="module")
def ref(ckpt):
    return build_tiny(str(ckpt))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _greedy(ref, ids, n, **extra):
    return ref.generate_ids([ids], max_new_tokens=n, temperature=0, **extra)


def _text_of(choices, key="text"):
    out = {}
    for c in choices:
        piece = getattr(c, key) if key == "text" else (c.delta.content or "")
        out[c.index] = out.get(c.index, "") + (piece or "")
    return out


# -- logprobs -------------------------------------------------------------------------------------
def test_chat_logprobs_greedy_are_the_top_logprob_and_match_float64(client, ref):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=4, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    prompt = ref.tokenizer.encode_chat(CHAT)
    outs, texts = _greedy(ref, prompt, 8, ignore_eos=True, logprobs=4)
    assert len(content) == len(outs[0]) == r.usage.completion_tokens
    want = ref.logits([prompt + outs[0]])[0].double().log_softmax(-1)
    for i, (item, tok, entry) in enumerate(zip(content, outs[0], texts[0].logprobs)):
        top = item.top_logprobs
        assert item.token == top[0].token and item.logprob == top[0].logprob      # greedy: the top token
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True) and len(top) == 4
        assert sum(math.exp(t.logprob) for t in top) <= 1 + 1e-6
        assert abs(item.logprob - float(want[len(prompt) - 1 + i, tok])) < 1e-4
        assert abs(item.logprob - entry[0]) < 1e-6
        assert bytes(item.bytes).decode("utf-8", errors="replace") == item.token
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=4, stream=True, extra_body={"ignore_eos": True})
    streamed = [item for chunk in stream for c in chunk.choices if c.logprobs for item in c.logprobs.content]
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, i.logprob) for i in content]


def test_completion_logprobs_with_echo(client, ref):
    text = "def add(a, b):"
    prompt = ref.tokenizer.encode(text)
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=5, temperature=0, echo=True, logprobs=2,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    outs, _ = _greedy(ref, prompt, 5, ignore_eos=True)
    assert c.text == text + ref.tokenizer.decode(outs[0])
    lp = c.logprobs
    assert len(lp.tokens) == len(prompt) + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None       # nothing predicts the first token
    want = ref.logits([prompt + outs[0]])[0].double().log_softmax(-1)
    for i in range(1, len(prompt) + 5):
        tok = (prompt + outs[0])[i]
        assert abs(lp.token_logprobs[i] - float(want[i - 1, tok])) < 1e-4
        assert len(lp.top_logprobs[i]) <= 2 and max(lp.top_logprobs[i].values()) >= lp.token_logprobs[i] - 1e-6
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    stream = client.completions.create(model=MODEL, prompt=text, max_tokens=5, temperature=0, echo=True, logprobs=2,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = [ch.choices[0] for ch in stream if ch.choices]
    assert chunks[0].text.startswith(text) and "".join(ch.text for ch in chunks) == c.text
    tokens = [t for ch in chunks if ch.logprobs for t in ch.logprobs.tokens]
    values = [v for ch in chunks if ch.logprobs for v in ch.logprobs.token_logprobs]
    assert tokens == lp.tokens and values == lp.token_logprobs


def test_echo_without_logprobs_and_with_token_ids(client, ref):
    ids = random_prompts(512, [6], random.randrange(2**31))[0]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0, echo=True,
                                  extra_body={"ignore_eos": True})
    outs, _ = _greedy(ref, ids, 3, ignore_eos=True)
    assert r.choices[0].text == ref.tokenizer.decode(ids) + ref.tokenizer.decode(outs[0])
    assert r.choices[0].logprobs is None


# -- n, a list of prompts -----------------------------------------------------------------------------
def test_n_choices_are_reproducible_and_prefill_once(server, client):
    stats = server.llm.engine.stats
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, seed=7, n=3,
                  extra_body={"ignore_eos": True, "top_k": 0})
    before = stats.prefill_tokens
    r = client.chat.completions.create(**kwargs)
    assert stats.prefill_tokens - before == r.usage.prompt_tokens        # the prompt computed once for 3 choices
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 24
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1
    assert [c.message.content for c in client.chat.completions.create(**kwargs).choices] == texts
    streamed = _text_of([c for ch in client.chat.completions.create(stream=True, **kwargs) for c in ch.choices],
                        key="delta")
    assert [streamed[i] for i in range(3)] == texts


def test_a_list_of_prompts_times_n_is_indexed_per_prompt_and_choice(client, ref):
    prompts = random_prompts(512, [5, 9], random.randrange(2**31))
    seed = random.randrange(2**31)
    kwargs = dict(model=MODEL, prompt=prompts, max_tokens=6, temperature=1.0, seed=seed, n=2,
                  extra_body={"ignore_eos": True, "top_k": 0})
    r = client.completions.create(**kwargs)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 14 and r.usage.completion_tokens == 24
    want = {}
    for i, p in enumerate(prompts):          # every prompt is seeded `seed`; choice j with choice_seed(seed, j)
        _, texts = ref.generate_ids([p], max_new_tokens=6, temperature=1.0, top_k=0, seed=seed, n=2, ignore_eos=True)
        want.update({2 * i + j: str(t) for j, t in enumerate(texts)})
    assert {c.index: c.text for c in r.choices} == want
    assert _text_of([c for ch in client.completions.create(stream=True, **kwargs) for c in ch.choices]) == want
    _, one = ref.generate_ids([prompts[0]], max_new_tokens=6, temperature=1.0, top_k=0, seed=choice_seed(seed, 1),
                              ignore_eos=True)
    assert want[1] == str(one[0])


# -- penalties, logit_bias, min_tokens, stop_token_ids ---------------------------------------------------
@pytest.fixture(scope="module")
def demo_client():
    llm = LLM(backend="cpu")                  # the embedded demo model, which loops under greedy decoding
    with ServerThread(llm, ServeOptions("demo")) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_a_penalty_changes_a_repetitive_greedy_output(demo_client):
    def complete(**extra):
        extra.setdefault("extra_body", {"repetition_penalty": 1.0})   # not the demo's generation_config 1.1
        r = demo_client.completions.create(model="demo", prompt="def add_result(self, future):", max_tokens=48,
                                           temperature=0, logprobs=0, **extra)
        return r.choices[0].text, r.choices[0].logprobs.tokens
    plain, plain_tokens = complete()
    assert len(plain_tokens) - len(set(plain_tokens)) > len(plain_tokens) // 3      # it loops
    for extra in (dict(frequency_penalty=1.5), dict(presence_penalty=1.5), dict(extra_body={"repetition_penalty": 1.5})):
        text, tokens = complete(**extra)
        assert text != plain and len(tokens) - len(set(tokens)) < len(plain_tokens) - len(set(plain_tokens)), extra
    stream = demo_client.completions.create(model="demo", prompt="def add_result(self, future):", max_tokens=48,
                                            temperature=0, frequency_penalty=1.5, stream=True,
                                            extra_body={"repetition_penalty": 1.0})
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == complete(frequency_penalty=1.5)[0]


@pytest.mark.parametrize("stream", [False, True])
def test_logit_bias_min_tokens_and_stop_token_ids(client, ref, stream):
    ids = random_prompts(512, [6], random.randrange(2**31))[0]

    def complete(max_tokens=6, **extra):
        r = client.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0, stream=stream,
                                      **extra)
        if not stream:
            return r.choices[0].text, r.choices[0].finish_reason
        chunks = [ch.choices[0] for ch in r if ch.choices]
        return "".join(c.text for c in chunks), chunks[-1].finish_reason
    greedy, _ = _greedy(ref, ids, 6, ignore_eos=True)
    text, _ = complete(logit_bias={"77": 100}, extra_body={"ignore_eos": True})
    assert text == ref.tokenizer.decode([77] * 6)                            # +100 forces it
    banned, _ = _greedy(ref, ids, 6, ignore_eos=True, logit_bias={greedy[0][0]: -100})
    assert greedy[0][0] not in banned[0]
    assert complete(logit_bias={str(greedy[0][0]): -100}, extra_body={"ignore_eos": True})[0] == \
        ref.tokenizer.decode(banned[0])
    stop = greedy[0][3]
    text, reason = complete(extra_body={"ignore_eos": True, "stop_token_ids": [stop]})
    assert text == ref.tokenizer.decode(greedy[0][: greedy[0].index(stop)]) and reason == "stop"
    # min_tokens holds a stop token id back until it is reached
    held, _ = _greedy(ref, ids, 8, ignore_eos=True, stop_token_ids=[stop], min_tokens=5)
    text, _ = complete(max_tokens=8, extra_body={"ignore_eos": True, "stop_token_ids": [stop], "min_tokens": 5})
    assert text == ref.tokenizer.decode(held[0]) and len(held[0]) >= 5


# -- the checkpoint's defaults --------------------------------------------------------------------------
def test_generation_config_defaults_apply_when_unset_and_explicit_values_win(client, ref):
    ids = random_prompts(512, [7], random.randrange(2**31))[0]
    greedy = ref.tokenizer.decode(_greedy(ref, ids, 6, ignore_eos=True)[0][0])
    unset = {client.completions.create(model=MODEL, prompt=ids, max_tokens=6, seed=s,
                                       extra_body={"ignore_eos": True}).choices[0].text for s in range(4)}
    assert unset == {greedy}                          # generation_config.json's top_k 1
    explicit = {client.completions.create(model=MODEL, prompt=ids, max_tokens=6, seed=s, temperature=1.0,
                                          extra_body={"ignore_eos": True, "top_k": 0}).choices[0].text
                for s in range(4)}
    assert len(explicit) > 1


# -- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, param", [
    (dict(logprobs=21), "logprobs"),
    (dict(n=17), "n"),
    (dict(best_of=3), "best_of"),
    (dict(frequency_penalty=2.5), "frequency_penalty"),
    (dict(presence_penalty=-3), "presence_penalty"),
    (dict(logit_bias={"abc": 1}), "logit_bias"),
    (dict(logit_bias={"512": 1}), "logit_bias"),
    (dict(logit_bias={"5": 150}), "logit_bias"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(extra_body={"min_tokens": 9}), "min_tokens"),
    (dict(extra_body={"stop_token_ids": [512]}), "stop_token_ids"),
    (dict(extra_body={"stop_token_ids": [-1]}), "stop_token_ids"),
])
def test_invalid_values_are_400s_naming_the_field(client, override, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": MODEL, "prompt": "hello", "max_tokens": 4, **override})
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body


@pytest.mark.parametrize("override, param", [(dict(logprobs=True, top_logprobs=21), "top_logprobs"),
                                             (dict(top_logprobs=2), "top_logprobs"), (dict(n=0), "n")])
def test_invalid_chat_values_are_400s_naming_the_field(client, override, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, **override)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body


# -- the engine process ---------------------------------------------------------------------------------
def test_logprobs_and_n_through_the_engine_process(ckpt, ref):
    from dsv3.serve.engine_process import EngineProcess
    engine = EngineProcess(build_tiny, (str(ckpt),), warm_up=False)
    info = engine.launch(timeout=120)
    model = ServedModel(ckpt, Tokenizer(ckpt), info["vocab_size"], info["max_context"], info["capacity_tokens"],
                        info["reserve"], info["backend"])
    ids = random_prompts(512, [8], random.randrange(2**31))[0]
    with ServerThread(None, ServeOptions(MODEL), worker=engine, model=model) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = c.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=1.0, seed=3, n=2, logprobs=1,
                                 echo=True, extra_body={"ignore_eos": True, "top_k": 0, "frequency_penalty": 0.5})
    _, texts = ref.generate_ids([ids], max_new_tokens=5, temperature=1.0, top_k=0, seed=3, n=2, logprobs=1,
                                ignore_eos=True, frequency_penalty=0.5)
    for choice, want in zip(sorted(r.choices, key=lambda c: c.index), texts):
        assert choice.text == ref.tokenizer.decode(ids) + want
        got = choice.logprobs.token_logprobs[len(ids):]
        assert all(abs(a - b[0]) < 1e-5 for a, b in zip(got, want.logprobs)) and len(got) == 5
