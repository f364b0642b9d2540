"""Sampling parameters through the engine (LLM): logprobs of the distribution sampled from, against a
float64 oracle of the reference model's logits; n choices (one prefill, shared blocks, seeds per
choice); penalties, logit_bias, min_tokens, stop_token_ids; prompt logprobs; the checkpoint's
generation_config.json defaults; MTP speculation with rows that take no drafts."""
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from dsv3 import LLM
from dsv3.core.errors import RequestError
from dsv3.core.sampling import LogitsProcessing, SamplingParams, choice_seed, generation_defaults

from helpers import make_checkpoint, random_prompts, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("sp") / "tiny", tiny_config(), seed=31, std=0.3)
    return path


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, backend="cpu", **{"kv_cache.block_size": 16})


def _oracle(llm, prompt, output):
    """float64 log-softmax of the reference model's logits at the positions that chose `output`."""
    logits = llm.logits([prompt + output])[0].double()
    return logits[len(prompt) - 1: len(prompt) - 1 + len(output)]                 # [len(output), V]


def test_greedy_logprobs_are_the_top_logprob_and_match_float64(llm):
    prompts = random_prompts(512, [7, 20], random.randrange(2**31))
    outs, texts = llm.generate_ids(prompts, max_new_tokens=10, logprobs=5, ignore_eos=True)
    for p, o, t in zip(prompts, outs, texts):
        want = _oracle(llm, p, o).log_softmax(-1)
        assert len(t.logprobs) == len(o)
        for i, (tok, (lp, ids, vals)) in enumerate(zip(o, t.logprobs)):
            assert ids[0] == tok and lp == vals[0]                  # greedy: the chosen token is the top one
            assert vals == sorted(vals, reverse=True) and len(vals) == 5
            assert sum(math.exp(v) for v in vals) <= 1 + 1e-6
            assert abs(lp - float(want[i, tok])) < 1e-4
            assert all(abs(v - float(want[i, j])) < 1e-4 for j, v in zip(ids, vals))


def test_sampled_logprobs_are_of_the_filtered_tempered_distribution(llm):
    p = random_prompts(512, [9], random.randrange(2**31))[0]
    temperature, top_k = 0.7, 4
    outs, texts = llm.generate_ids([p], max_new_tokens=8, temperature=temperature, top_k=top_k, seed=5,
                                   logprobs=6, ignore_eos=True)
    rows = _oracle(llm, p, outs[0]) / temperature
    for i, (tok, (lp, ids, vals)) in enumerate(zip(outs[0], texts[0].logprobs)):
        row = rows[i]
        kth = row.topk(top_k).values[-1]
        want = row.masked_fill(row < kth, float("-inf")).log_softmax(-1)
        assert abs(lp - float(want[tok])) < 1e-4
        assert all(abs(v - float(want[j])) < 1e-4 for j, v in zip(ids[:top_k], vals[:top_k]))
        assert vals[top_k:] == [float("-inf")] * 2                 # filtered out: not samplable


def test_n_choices_prefill_once_share_blocks_and_reproduce(llm):
    eng = llm.engine
    for length in (37, 32):                # a partial last block (copied), and whole blocks only (shared)
        p = random_prompts(512, [length], random.randrange(2**31))[0]
        before = eng.stats.prefill_tokens
        outs, texts = llm.generate_ids([p], max_new_tokens=12, temperature=1.0, seed=11, n=3, ignore_eos=True)
        assert eng.stats.prefill_tokens - before == length           # computed once for three choices
        assert len(outs) == 3 and len({tuple(o) for o in outs}) == 3
        again, _ = llm.generate_ids([p], max_new_tokens=12, temperature=1.0, seed=11, n=3, ignore_eos=True)
        assert again == outs
        # choice j is the single request seeded choice_seed(11, j): forking changes nothing
        for j in range(3):
            alone, _ = llm.generate_ids([p], max_new_tokens=12, temperature=1.0, seed=choice_seed(11, j),
                                        ignore_eos=True)
            assert alone[0] == outs[j]
        assert llm.cache.allocator.num_used == 0                      # every shared block given back


def test_n_choices_see_one_another_in_the_block_tables(llm):
    """While they run, the choices hold the prompt's full blocks together (refcount n)."""
    eng = llm.engine
    p = random_prompts(512, [40], random.randrange(2**31))[0]
    seqs = eng.add_choices(p, [SamplingParams(max_new_tokens=4, temperature=1.0, seed=s, ignore_eos=True)
                               for s in (1, 2, 3)])
    while not all(s.num_cached >= 40 for s in seqs):
        eng.step()
    full = 40 // 16
    assert [s.blocks[:full] for s in seqs[1:]] == [seqs[0].blocks[:full]] * 2
    assert all(eng.cache.allocator.refcount(b) == 3 for b in seqs[0].blocks[:full])
    assert len({s.blocks[full] for s in seqs}) == 3                    # each its own copy of the partial block
    eng.run_to_completion()
    assert eng.cache.allocator.num_used == 0


def test_a_choice_that_finds_no_free_block_waits_and_still_matches(ckpt):
    """Three blocks: the leader holds two, one follower forks into the third, the other finds none and
    waits, then recomputes its prompt past the prefix cache: the same tokens as a solo run of its seed."""
    small = LLM(ckpt, backend="cpu", **{"kv_cache.block_size": 16, "kv_cache.max_tokens": 48})
    p = random_prompts(512, [20], random.randrange(2**31))[0]
    outs, _ = small.generate_ids([p], max_new_tokens=8, temperature=1.0, seed=9, n=3, ignore_eos=True)
    assert small.engine.stats.prefill_tokens > 20                     # the third choice computed its own
    for j in range(3):
        alone, _ = small.generate_ids([p], max_new_tokens=8, temperature=1.0, seed=choice_seed(9, j), ignore_eos=True)
        assert alone[0] == outs[j]
    assert small.cache.allocator.num_used == 0


def _rows(*seqs):
    return [SimpleNamespace(params=p, token_ids=ids, prompt_len=n) for p, ids, n in seqs]


def test_penalties_on_a_hand_made_row_against_float64():
    """frequency subtracts per occurrence, presence once per token generated; repetition (prompt and
    output) divides positive logits and multiplies negative ones; prompt tokens count only for it."""
    g = torch.Generator().manual_seed(random.randrange(2**31))
    logits = torch.randn(3, 10, generator=g) * 3
    prompt, output = [4, 4, 9], [2, 2, 2, 7, 4]
    freq = SamplingParams(frequency_penalty=0.5)
    pres = SamplingParams(presence_penalty=0.5)
    rep = SamplingParams(repetition_penalty=1.3, frequency_penalty=-0.25, presence_penalty=0.75)
    got = logits.clone()
    LogitsProcessing.build(_rows(*[(p, prompt + output, 3) for p in (freq, pres, rep)]), [1], "cpu").apply(got)
    x = logits.double()
    counts = torch.zeros(10, dtype=torch.float64)
    for t in output:
        counts[t] += 1
    seen = counts > 0
    seen[prompt] = True
    want_freq = x[0] - 0.5 * counts
    want_pres = x[1] - 0.5 * (counts > 0)
    r = torch.where(seen, torch.where(x[2] > 0, x[2] / 1.3, x[2] * 1.3), x[2])
    want_rep = r + 0.25 * counts - 0.75 * (counts > 0)
    for row, want in zip(got, (want_freq, want_pres, want_rep)):
        assert torch.allclose(row.double(), want, atol=1e-5)
    # token 2 (3 times) vs token 7 (once): frequency tells them apart, presence does not
    assert abs((x[0, 2] - got[0, 2]) - 3 * (x[0, 7] - got[0, 7])) < 1e-5
    assert abs((x[1, 2] - got[1, 2]) - (x[1, 7] - got[1, 7])) < 1e-5
    assert LogitsProcessing.build(_rows((SamplingParams(), [1, 2], 1)), [1], "cpu") is None   # nothing to do


def test_logit_bias_and_min_tokens_on_a_hand_made_row():
    logits = torch.zeros(2, 8)
    bias = SamplingParams(logit_bias=((3, 5.0), (6, -100.0)))
    early = SamplingParams(min_tokens=3, stop_token_ids=(5,), max_new_tokens=8)
    LogitsProcessing.build(_rows((bias, [0, 1], 1), (early, [0, 1, 2], 1)), [1, 7], "cpu").apply(logits)
    assert logits[0, 3] == 5 and logits[0, 6] == -100 and logits[0].abs().sum() == 105
    assert torch.isinf(logits[1, [1, 5, 7]]).all() and logits[1, [0, 2, 3, 4, 6]].abs().sum() == 0
    done = torch.zeros(1, 8)       # min_tokens reached: EOS allowed again
    LogitsProcessing.build(_rows((early, [0, 1, 2, 3], 1)), [1, 7], "cpu").apply(done)
    assert done.abs().sum() == 0


def test_a_penalty_changes_a_repetitive_greedy_output():
    """The demo model repeats itself under plain greedy decoding (its generation_config's repetition
    penalty set back to 1); a frequency penalty breaks the loop."""
    demo = LLM(backend="cpu")
    prompt = "def add_result(self, future):"
    plain = demo.generate(prompt, max_new_tokens=48, temperature=0, repetition_penalty=1.0)
    pen = demo.generate(prompt, max_new_tokens=48, temperature=0, frequency_penalty=1.5, repetition_penalty=1.0)
    rep = demo.generate(prompt, max_new_tokens=48, temperature=0, repetition_penalty=1.5)

    def repeats(ids):
        return len(ids) - len(set(ids))
    assert repeats(plain.token_ids) > len(plain.token_ids) // 3       # repetitive to begin with
    assert pen != plain and repeats(pen.token_ids) < repeats(plain.token_ids)
    assert rep != plain and repeats(rep.token_ids) < repeats(plain.token_ids)


def test_logit_bias_forces_and_bans(llm):
    p = random_prompts(512, [6], random.randrange(2**31))[0]
    greedy, _ = llm.generate_ids([p], max_new_tokens=8, ignore_eos=True)
    forced, _ = llm.generate_ids([p], max_new_tokens=8, ignore_eos=True, logit_bias={77: 100})
    assert forced[0] == [77] * 8
    banned, _ = llm.generate_ids([p], max_new_tokens=8, ignore_eos=True, logit_bias={greedy[0][0]: -100})
    assert greedy[0][0] not in banned[0]
    with pytest.raises(RequestError, match="logit_bias"):
        llm.generate_ids([p], max_new_tokens=2, logit_bias={512: 1})
    with pytest.raises(RequestError, match="logit_bias"):
        llm.generate_ids([p], max_new_tokens=2, logit_bias={3: 101})


def test_min_tokens_suppresses_eos_and_stop_token_ids_stop(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", tiny_config(), seed=31, std=0.3)
    ids = random_prompts(512, [6], random.randrange(2**31))[0]
    free, _ = LLM(path, backend="cpu").generate_ids([ids], max_new_tokens=10, ignore_eos=True)
    eos = free[0][2]
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "eos_token_id": eos}))
    llm = LLM(path, backend="cpu")
    cut, texts = llm.generate_ids([ids], max_new_tokens=10)
    assert cut[0] == free[0][:2] and texts[0].finish_reason == "stop"
    held, texts = llm.generate_ids([ids], max_new_tokens=10, min_tokens=6)
    assert len(held[0]) >= 6 and eos not in held[0][:6]
    # a stop token id ends the output like EOS (not part of it), from its first occurrence
    stop = free[0][4]
    stopped, texts = llm.generate_ids([ids], max_new_tokens=10, ignore_eos=True, stop_token_ids=[stop])
    assert stopped[0] == free[0][: free[0].index(stop)] and texts[0].finish_reason == "stop"


def test_prompt_logprobs_match_float64_across_chunks_and_the_prefix_cache(llm):
    eng = llm.engine
    p = random_prompts(512, [45], random.randrange(2**31))[0]
    llm.generate_ids([p], max_new_tokens=1)                     # its blocks now sit in the prefix cache
    saved, eng.max_batch_tokens = eng.max_batch_tokens, 20      # the prompt in three chunks
    try:
        _, texts = llm.generate_ids([p], max_new_tokens=3, prompt_logprobs=3)
    finally:
        eng.max_batch_tokens = saved
    want = llm.logits([p])[0].double().log_softmax(-1)
    entries = texts[0].prompt_logprobs
    assert len(entries) == len(p) - 1                            # every prompt token after the first
    for i, (lp, ids, vals) in enumerate(entries):
        assert abs(lp - float(want[i, p[i + 1]])) < 1e-4
        assert ids == want[i].topk(3).indices.tolist()
        assert all(abs(v - float(want[i, j])) < 1e-4 for j, v in zip(ids, vals))


def test_generation_config_defaults_apply_when_unset(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", tiny_config(), seed=31, std=0.3)
    (path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": -1, "bos_token_id": 0}))
    assert generation_defaults(path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 0}
    llm = LLM(path, backend="cpu")
    p = llm.sampling_params()
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.95, 0)
    assert llm.sampling_params(temperature=0, top_p=0.5).greedy                   # explicit values win
    ids = random_prompts(512, [6], 3)[0]
    sampled = {tuple(llm.generate_ids([ids], max_new_tokens=6, seed=s, ignore_eos=True)[0][0]) for s in range(6)}
    greedy = llm.generate_ids([ids], max_new_tokens=6, temperature=0, seed=0, ignore_eos=True)[0][0]
    assert len(sampled) > 1 and llm.generate_ids([ids], max_new_tokens=6, temperature=0, seed=1,
                                                  ignore_eos=True)[0][0] == greedy
    assert generation_defaults(tmp_path) == {}                                    # no file: no defaults


@pytest.mark.parametrize("extra", [dict(logprobs=2), dict(frequency_penalty=0.7), dict(logit_bias={9: 3.0}),
                                   dict(min_tokens=4)])
def test_mtp_rows_with_logit_edits_or_logprobs_take_no_drafts(tmp_path, extra):
    """Greedy output and logprobs are those of plain decoding; such rows are never verified (min_tokens:
    not before it is reached), while a plain row in the same batch still drafts."""
    path, _ = make_checkpoint(tmp_path / "m", tiny_config(), seed=33, std=0.3)
    plain = LLM(path, backend="cpu")
    spec = LLM(path, backend="cpu", **{"speculative.method": "mtp", "speculative.num_draft_tokens": 2})
    prompts = random_prompts(512, [7, 11], random.randrange(2**31))
    want, want_t = plain.generate_ids(prompts[:1], max_new_tokens=10, ignore_eos=True, **extra)
    got, got_t = spec.generate_ids(prompts[:1], max_new_tokens=10, ignore_eos=True, **extra)
    assert got == want and spec.engine.stats.spec.emitted <= 10 - extra.get("min_tokens", 10)
    if "logprobs" in extra:
        for a, b in zip(want_t[0].logprobs, got_t[0].logprobs):
            assert a[1] == b[1] and abs(a[0] - b[0]) < 1e-5
    # mixed with a plain row: that one drafts, both come out as without speculation
    seqs = [spec.engine.add(prompts[0], spec.sampling_params(max_new_tokens=10, ignore_eos=True, **extra)),
            spec.engine.add(prompts[1], spec.sampling_params(max_new_tokens=10, ignore_eos=True))]
    spec.engine.run_to_completion()
    assert seqs[0].output_ids == want[0]
    assert seqs[1].output_ids == plain.generate_ids(prompts[1:], max_new_tokens=10, ignore_eos=True)[0][0]
    assert spec.engine.stats.spec.verify_steps > 0


def test_n_choices_under_mtp(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", tiny_config(), seed=34, std=0.3)
    plain = LLM(path, backend="cpu")
    spec = LLM(path, backend="cpu", **{"speculative.method": "mtp", "speculative.num_draft_tokens": 1})
    p = random_prompts(512, [70], random.randrange(2**31))[0]
    want, _ = plain.generate_ids([p], max_new_tokens=10, temperature=0.9, seed=4, n=3, ignore_eos=True)
    got, _ = spec.generate_ids([p], max_new_tokens=10, temperature=0.0, seed=4, n=3, ignore_eos=True)
    greedy, _ = plain.generate_ids([p], max_new_tokens=10, ignore_eos=True)
    assert got == greedy * 3                        # greedy: every choice is the greedy output
    again, _ = plain.generate_ids([p], max_new_tokens=10, temperature=0.9, seed=4, n=3, ignore_eos=True)
    assert again == want
    assert spec.cache.allocator.num_used == 0


def test_cli_flags_reach_the_engine(ckpt, tmp_path, capsys):
    """--n, --logprobs, penalties, --logit-bias, --stop-token-id in a JSONL run equal LLM.generate_ids; bad
    values fail before the model loads, naming the flag."""
    from dsv3.commands.main import main
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hello world", "id": 1}\n{"prompt": "def add(a, b):", "id": 2}\n')
    args = ["--model", str(ckpt), "--input-file", str(f), "--max-new-tokens", "5", "--temperature", "0.9", "--seed",
            "4", "--n", "2", "--logprobs", "2", "--frequency-penalty", "0.5", "--logit-bias", "7=-100",
            "--stop-token-id", "9", "--max-cache-tokens", "4096"]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["id"], r["choice"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    llm = LLM(ckpt, backend="cpu")
    ids = [llm.tokenizer.encode(p) for p in ("hello world", "def add(a, b):")]
    _, texts = llm.generate_ids(ids, max_new_tokens=5, temperature=0.9, seed=4, n=2, logprobs=2,
                                frequency_penalty=0.5, logit_bias={7: -100}, stop_token_ids=[9])
    assert [r["completion"] for r in rows] == [str(t) for t in texts]
    assert [[e["logprob"] for e in r["logprobs"]] for r in rows] == [[e[0] for e in t.logprobs] for t in texts]
    assert all(len(e["top_logprobs"]) <= 2 for r in rows for e in r["logprobs"])
    for bad, flag in ((["--presence-penalty", "3"], "--presence-penalty"), (["--logit-bias", "7"], "--logit-bias"),
                      (["--n", "0"], "--n"), (["--logprobs", "21"], "--logprobs")):
        assert main(["--model", str(tmp_path / "absent"), "--prompt", "x", *bad]) != 0
        assert flag in capsys.readouterr().err
