"""Engine behaviour: stop strings, EOS, max tokens, sampling controls, streaming, batching."""
import json
import random

import pytest
import torch

from dsv3 import LLM
from dsv3.core.errors import RequestError
from dsv3.core.sampling import SamplingBatch, SamplingParams

from helpers import make_checkpoint, tiny_config


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("m") / "tiny", tiny_config(), seed=11, std=0.3)
    return LLM(path, backend="cpu")


def test_stop_string_cuts_output(llm):
    full = llm.generate(["hello world"], max_new_tokens=24)[0]
    assert len(full) > 6
    stop = full[3:6]
    cut = llm.generate(["hello world"], max_new_tokens=24, stop=[stop])[0]
    assert cut == full[: full.find(stop)]


def test_streamed_deltas_add_up_to_the_text(llm):
    pieces = {0: [], 1: []}
    texts = llm.generate(["hello", "def add(a, b):"], max_new_tokens=12, temperature=0.9, seed=5,
                         on_output=lambda i, out: pieces[i].append(out.delta))
    assert ["".join(pieces[i]) for i in range(2)] == texts


def test_eos_stops_and_max_tokens_bounds(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", tiny_config(), seed=11, std=0.3)
    llm = LLM(path, backend="cpu")
    ids = llm.tokenizer.encode("hello world")
    outs, _ = llm.generate_ids([ids], max_new_tokens=5)
    assert len(outs[0]) == 5
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "eos_token_id": outs[0][2]}))
    outs2, _ = LLM(path, backend="cpu").generate_ids([ids], max_new_tokens=5)
    assert outs2[0] == outs[0][:2]   # stops at EOS, which is not part of the output


def test_sampling_controls(llm):
    ids = [llm.tokenizer.encode(p) for p in ("hello world", "Beautiful")]
    greedy, _ = llm.generate_ids(ids, max_new_tokens=8)
    assert llm.generate_ids(ids, max_new_tokens=8, temperature=1.5, top_k=1, seed=1)[0] == greedy
    assert llm.generate_ids(ids, max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=2)[0] == greedy
    a = llm.generate_ids(ids, max_new_tokens=8, temperature=1.5, seed=3)[0]
    assert llm.generate_ids(ids, max_new_tokens=8, temperature=1.5, seed=3)[0] == a
    assert llm.generate_ids(ids, max_new_tokens=8, temperature=1.5, seed=4)[0] != a


def test_batch_equals_one_by_one(llm):
    prompts = ["hello world", "def add(a, b):\n    return", "B", "ugly " * 30]
    together = llm.generate(prompts, max_new_tokens=10)
    assert together == [llm.generate([p], max_new_tokens=10)[0] for p in prompts]


def test_sampling_filters_per_row():
    """One batch, each row its own temperature / top-k / top-p, against a float64 computation per row."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(random.randrange(2**31)))
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=1.3), SamplingParams(temperature=0.5, top_k=20, top_p=0.8)]
    probs = SamplingBatch(params, [0] * 4, [0] * 4, "cpu").probs(logits)
    for row, p in zip(range(4), params):
        want = (logits[row].double() / p.temperature)
        if p.top_k:
            want = want.masked_fill(want < want.topk(p.top_k).values[-1], float("-inf"))
        want = want.softmax(-1)
        if p.top_p < 1:
            sorted_p, order = want.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p <= p.top_p          # the smallest prefix reaching top_p
            want = torch.zeros_like(want).scatter_(0, order, sorted_p * keep)
            want = want / want.sum()
        assert torch.allclose(probs[row].double(), want, atol=1e-6), row


def test_batched_sampler_distribution_and_seeds():
    """Draws follow the row's distribution (chi-square over fresh seeds); a seeded row draws the same
    token whatever shares its batch; greedy rows in a mixed batch take the argmax."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    logits = torch.randn(12, generator=gen) * 1.5
    p = SamplingParams(temperature=0.9, top_k=10)
    n = 20_000
    seeds = torch.randint(0, 2**62, (n,), generator=gen).tolist()
    rows = SamplingBatch([p] * n, seeds, [3] * n, "cpu")
    counts = torch.bincount(rows.sample(logits.expand(n, 12)), minlength=12).double()
    probs = SamplingBatch([p], [0], [0], "cpu").probs(logits[None])[0].double()
    keep = probs > 0
    assert counts[~keep].sum() == 0
    stat = ((counts[keep] - n * probs[keep]) ** 2 / (n * probs[keep])).sum()
    df = int(keep.sum()) - 1
    assert float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2)) > 1e-4
    # reproducible per row, independent of the batch around it and of the row's place in it
    alone = SamplingBatch([p], [seeds[0]], [3], "cpu").sample(logits[None])
    mixed = SamplingBatch([SamplingParams(), p, SamplingParams(temperature=2.0)], [1, seeds[0], 2], [9, 3, 4], "cpu")
    other_logits = torch.randn(3, 12, generator=gen)
    other_logits[1] = logits
    got = mixed.sample(other_logits)
    assert got[1] == alone[0] and got[0] == other_logits[0].argmax()
    # positions and seeds both change the draw
    draws = SamplingBatch([p] * 64, [7] * 64, list(range(64)), "cpu").sample(logits.expand(64, 12))
    assert len(set(draws.tolist())) > 1


def test_a_zero_probability_token_is_never_drawn_even_by_the_largest_uniform(monkeypatch):
    """The exponential race argmax p / -log(u) needs u < 1: with u == 1.0 a token of probability 0 (masked
    by a grammar, cut by top-p) won as 0/0 = NaN (seen as 'the grammar refused token 140, which its
    bitmask allowed' about once in four runs of the required-tool-call test)."""
    from dsv3.core import sampling
    largest = torch.full((1, 4), 2**32 - 1, dtype=torch.int64)
    u = sampling.unit_interval(largest)
    assert bool((u > 0).all() and (u < 1).all() and (-u.log() > 0).all())
    assert 0 < sampling.unit_interval(torch.zeros(1, dtype=torch.int64)).item() < 1
    rows = SamplingBatch([SamplingParams(temperature=1.0)], [5], [0], "cpu")
    monkeypatch.setattr(rows, "uniform", lambda stream, width: sampling.unit_interval(largest[:, :width]))
    assert rows.choose(torch.tensor([[0.0, 0.7, 0.0, 0.3]]), stream=0).item() in (1, 3)


def test_bad_sampling_values_are_clear():
    for kwargs, key in (({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                        ({"max_new_tokens": 0}, "max_new_tokens"), ({"top_k": -2}, "top_k")):
        with pytest.raises(RequestError, match=key):
            SamplingParams(**kwargs)


def test_warm_up_leaves_nothing_behind(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", tiny_config(), seed=12, std=0.3)
    cold = LLM(path, backend="cpu")
    prompts = [cold.tokenizer.encode(p) for p in ("hello world", "def add(a, b):", "ugly " * 20)]
    expected, _ = cold.generate_ids(prompts, max_new_tokens=10)
    warm = LLM(path, backend="cpu")
    engine = warm.engine
    engine.max_batch_tokens = 300
    steps = engine.warm_up(max_batch=8)
    # decode batches of 1, 2, 4, 8 (a prefill and 4 decode steps each), lone prefills of 16, 17, ..., 256, 257 tokens
    assert steps == 4 * 5 + 10
    assert not engine.has_work()
    assert engine.cache.allocator.num_used == 0 and engine.cache.allocator.num_registered == 0
    assert engine.prefix_caching and engine.stats.steps == 0
    assert warm.generate_ids(prompts, max_new_tokens=10)[0] == expected


_READS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__", "cpu", "numpy")


def _reads_per_step(llm, batch: int, monkeypatch, **features) -> float:
    """Device->host reads (every Tensor method that hands a value to Python) per engine step of a
    sampled generation of `batch` sequences; on a GPU each one is a synchronisation."""
    prompts = [[5 + (7 * i + j) % 400 for j in range(6)] for i in range(batch)]
    calls = [0]
    with monkeypatch.context() as m:
        for name in _READS:
            real = getattr(torch.Tensor, name)

            def counted(self, *a, _real=real, **k):
                calls[0] += 1
                return _real(self, *a, **k)
            m.setattr(torch.Tensor, name, counted)
        before = llm.engine.stats.steps
        llm.generate_ids(prompts, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True, **features)
        steps = llm.engine.stats.steps - before
    return calls[0] / steps


# logprobs with alternatives, every penalty, logit_bias and min_tokens, n = 2 choices, echo's prompt logprobs
FEATURES = dict(logprobs=5, prompt_logprobs=2, presence_penalty=0.3, frequency_penalty=0.2, repetition_penalty=1.1,
                logit_bias={7: 2.0, 9: -100.0}, min_tokens=3, n=2)


@pytest.mark.parametrize("speculative, features", [(False, {}), (True, {}), (False, FEATURES), (True, FEATURES)],
                         ids=["plain", "mtp", "plain-features", "mtp-features"])
def test_device_to_host_reads_per_step_do_not_grow_with_batch(tmp_path, monkeypatch, speculative, features):
    """The runner samples (and verifies drafts for) the whole batch on the device and copies the
    chosen ids once, with their logprobs when asked for (LogitsProcessing builds its edits from host
    lists, so penalties read nothing back); the drafter copies its drafts once. The rest are the
    reference ops' own reads (CPU kernels), the same at any batch size. Before: 11 reads per step at
    batch 4, 39 at 32."""
    path, _ = make_checkpoint(tmp_path / "m", tiny_config(), seed=5, std=0.3)
    extra = {"speculative.method": "mtp", "speculative.num_draft_tokens": 2} if speculative else {}
    llm = LLM(path, backend="cpu", **extra)
    small, large = _reads_per_step(llm, 4, monkeypatch, **features), _reads_per_step(llm, 32, monkeypatch, **features)
    assert large <= small + 2, (small, large)
    # plain decoding: <= 8; with MTP the reference ops of the MTP layer's passes read as well (~11)
    assert large <= (12 if speculative else 8), (small, large)


def test_incremental_detokenisation_equals_a_whole_decode():
    """Each step decodes only a window of the newest tokens: on random ids (byte tokens that split UTF-8
    characters among them), arriving 1-3 per step, the text so far is always a prefix of the whole
    decode, all of it whenever that ends in a complete character, and at the end equals it."""
    from dsv3.core.scheduler import Sequence
    from dsv3.demo import demo_model_path
    from dsv3.core.tokenizer import Tokenizer
    from dsv3.core.engine import Engine
    tok = Tokenizer(demo_model_path())
    decoded = Engine._decoded
    probe = type("E", (), {"tokenizer": tok})()
    rng = random.Random(0)
    multibyte = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
    assert multibyte, "the demo tokenizer has byte tokens that split characters"
    for trial in range(30):
        s = Sequence([0], 1, SamplingParams())
        ids = []
        while len(ids) < 60:
            new = [rng.choice(multibyte) if rng.random() < 0.3 else rng.randrange(2, tok.vocab_size)
                   for _ in range(rng.randint(1, 3))]
            ids += new
            s.token_ids += new
            whole = tok.decode(ids)
            text = decoded(probe, s)
            assert whole.startswith(text), (trial, text, whole)
            if not whole.endswith("\ufffd"):           # nothing unfinished: all of it is out
                assert text == whole, (trial, text, whole)
        s.finish_reason = "length"
        assert decoded(probe, s) == tok.decode(ids)


def test_step_phases_account_for_the_step_time(llm):
    """EngineStats.phases (schedule / prepare / launch / wait / post, what serve_load and /metrics report)
    add up to the steps' own time, and a generating step spends time in preparing, launching and post."""
    from dsv3.core.engine import STEP_PHASES, EngineStats
    llm.engine.stats = EngineStats()
    llm.generate(["hello", "def add(a, b):", "import json"], max_new_tokens=10)
    st = llm.engine.stats
    assert set(st.phases) == set(STEP_PHASES) and all(v >= 0 for v in st.phases.values())
    assert st.phases["prepare"] > 0 and st.phases["launch"] > 0 and st.phases["post"] > 0
    assert abs(sum(st.phases.values()) - st.seconds) <= 1e-3 * st.steps + 1e-6 * st.seconds
