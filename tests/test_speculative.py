"""MTP speculative decoding: greedy equality, distribution-preserving rejection sampling, cache rollback."""
import random

import pytest
import torch

from dsv3 import LLM
from dsv3.core.sampling import SamplingBatch, SamplingParams
from dsv3.core.speculative import verify

from helpers import assert_cache_matches_a_fresh_pass, make_checkpoint, oracle_drafts, random_prompts, tiny_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("m") / "tiny", tiny_config(vocab_size=96), seed=3, std=0.3)
    return path


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_speculation_equals_plain_decoding(ckpt, monkeypatch, k):
    seed = random.randrange(2**31)
    plain = LLM(ckpt, backend="cpu", **{"kv_cache.block_size": 8})
    spec = LLM(ckpt, backend="cpu", **{"kv_cache.block_size": 8, "speculative.method": "mtp",
                                       "speculative.num_draft_tokens": k, "speculative.policy": "always"})
    prompts = random_prompts(96, [1, 7, 3, 20, 9, 2], seed)
    accepted = proposed = 0
    for batch in (prompts[:1], prompts):                           # a single sequence, and a ragged batch
        want, _ = plain.generate_ids(batch, max_new_tokens=13, ignore_eos=True)
        got, _ = spec.generate_ids(batch, max_new_tokens=13, ignore_eos=True)   # the real (random) MTP drafts
        assert got == want
        reference = {tuple(p): w for p, w in zip(batch, want)}
        oracle_drafts(monkeypatch, reference, wrong_rate=0.3, rng=random.Random(seed))
        spec.engine.stats.spec.__init__()
        got, _ = spec.generate_ids(batch, max_new_tokens=13, ignore_eos=True)
        monkeypatch.undo()
        assert got == want, f"k={k} seed={seed}"
        accepted += sum(spec.engine.stats.spec.accepted)
        proposed += sum(spec.engine.stats.spec.proposed)
    # both paths were taken (over ~45 oracle drafts corrupted at 30%; one short sequence alone may not)
    assert 0 < accepted < proposed
    assert spec.cache.allocator.num_free == spec.cache.num_blocks


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled a token the target excludes"
    n = counts.sum()
    expected = probs[keep] * n
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat.double() / 2))


def _top_k_softmax(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution temperature + top-k define, per row, in float64 (independent of SamplingBatch)."""
    z = logits.double() / params.temperature
    kth = z.topk(params.top_k, dim=-1).values[:, -1:]
    return z.masked_fill(z < kth, float("-inf")).softmax(-1)


def test_rejection_sampling_preserves_the_target_distribution():
    """First emitted token ~ p_0 and, after an accepted first draft, the second ~ p_1, with top-k applied
    to draft and target alike. Chi-square test per position at significance 1e-4 (fresh distributions).
    All n trials are verified as one batch on the device path (one row each, its own seed)."""
    torch.manual_seed(random.randrange(2**31))
    vocab, k, n = 8, 2, 20_000
    params = SamplingParams(temperature=0.8, top_k=6)
    target_logits = torch.randn(k + 1, vocab) * 2
    draft_logits = torch.randn(k, vocab) * 2
    q = _top_k_softmax(draft_logits, params)                      # [k, V], the draft's own distribution
    p = _top_k_softmax(target_logits, params)                     # [k+1, V], the float64 oracle
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=gen) for j in range(k)], 1)
    seeds = torch.randint(0, 2**62, (n,), generator=gen).tolist()
    rows = SamplingBatch([params] * n, seeds, [5] * n, "cpu")
    tokens, accepted = verify(target_logits.expand(n, k + 1, vocab), drafts, q.float().expand(n, k, vocab), rows)
    first = torch.bincount(tokens[:, 0], minlength=vocab).float()
    second = torch.bincount(tokens[accepted >= 1, 1], minlength=vocab).float()
    assert _chi2_pvalue(first, p[0]) > 1e-4
    assert _chi2_pvalue(second, p[1]) > 1e-4
    assert 0 < int((accepted == 0).sum()) < n                     # both paths were taken
    # the plain sampler, for scale: the same test on its own draws from p_0
    direct = torch.bincount(rows.sample(target_logits[:1].expand(n, vocab)), minlength=vocab).float()
    assert _chi2_pvalue(direct, p[0]) > 1e-4


def test_sampled_speculation_runs_and_is_seeded(ckpt):
    spec = LLM(ckpt, backend="cpu", **{"speculative.method": "mtp", "speculative.num_draft_tokens": 2,
                                       "speculative.policy": "always"})   # adaptive: other draws, same distribution
    prompts = random_prompts(96, [5, 9], random.randrange(2**31))
    a, _ = spec.generate_ids(prompts, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=4, ignore_eos=True)
    b, _ = spec.generate_ids(prompts, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=4, ignore_eos=True)
    assert a == b and all(len(x) == 12 for x in a)


def test_cache_rollback_matches_plain_decoding(ckpt, monkeypatch):
    """After steps with rejections, the main cache equals plain decoding's over the accepted tokens, and
    the MTP cache equals a fresh MTP pass over them."""
    plain = LLM(ckpt, backend="cpu", **{"kv_cache.block_size": 4})
    spec = LLM(ckpt, backend="cpu", **{"kv_cache.block_size": 4, "speculative.method": "mtp",
                                       "speculative.num_draft_tokens": 3, "speculative.policy": "always"})
    prompt = random_prompts(96, [6], random.randrange(2**31))[0]
    want, _ = plain.generate_ids([prompt], max_new_tokens=30, ignore_eos=True)
    oracle_drafts(monkeypatch, {tuple(prompt): want[0]}, wrong_rate=0.4, rng=random.Random(1))
    eng = spec.engine
    seq = eng.add(prompt, SamplingParams(max_new_tokens=30, ignore_eos=True))
    for _ in range(6):
        eng.step()
    assert not seq.finished and sum(eng.stats.spec.accepted) < sum(eng.stats.spec.proposed)
    assert seq.token_ids == prompt + want[0][: len(seq.output_ids)]
    assert_cache_matches_a_fresh_pass(plain, spec.cache, seq)


def test_warm_up_of_a_speculative_engine_changes_nothing(ckpt):
    plain = LLM(ckpt, backend="cpu", **{"kv_cache.block_size": 8})
    prompts = random_prompts(96, [1, 7, 20], random.randrange(2**31))
    want, _ = plain.generate_ids(prompts, max_new_tokens=9, ignore_eos=True)
    spec = LLM(ckpt, backend="cpu", **{"kv_cache.block_size": 8, "speculative.method": "mtp",
                                       "speculative.num_draft_tokens": 2})
    spec.engine.max_batch_tokens = 64
    assert spec.engine.warm_up(max_batch=4) > 0
    assert spec.cache.allocator.num_used == 0 and spec.engine.stats.spec.verify_steps == 0
    got, _ = spec.generate_ids(prompts, max_new_tokens=9, ignore_eos=True)
    assert got == want
