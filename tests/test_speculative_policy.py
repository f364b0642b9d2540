"""DraftPolicy on synthetic step costs and acceptances, and the engine with drafting switched on and
off mid-generation: outputs and caches as plain decoding's."""
import random

import pytest
import torch

from dsv3 import LLM
from dsv3.core.sampling import SamplingParams
from dsv3.core.speculative import DraftPolicy

from helpers import assert_cache_matches_a_fresh_pass, make_checkpoint, oracle_drafts, random_prompts, tiny_config


def cost_model(k: int):
    """Seconds of a step of B sequences: weights read once, per-token work, drafting's MTP passes and heads."""
    def cost(verified: bool, drafted: bool, batch: int) -> float:
        tokens = batch * (k + 1 if verified else 1)
        return 10 + 0.08 * tokens + (0.4 + 0.3 * k + 0.002 * batch * k if drafted else 0.2)
    return cost


def simulate(policy, k, steps, batch, acceptance, cost, rng):
    """The engine's loop around the policy: decide, verify what the last step drafted (drafts accepted
    with probability acceptance(step) each, in order), time clean steps. (tokens, seconds, drafting steps)."""
    tokens = seconds = 0.0
    drafted, on = False, []
    for t in range(steps):
        d = policy.decide(batch)
        on.append(d)
        if drafted:
            for _ in range(batch):
                n = 0
                while n < k and rng.random() < acceptance(t):
                    n += 1
                policy.observe_acceptance(k, n)
                tokens += n + 1
        else:
            tokens += batch
        c = cost(drafted, d, batch)
        seconds += c
        if drafted == d:
            policy.observe_step(d, batch, c)
        drafted = d
    return tokens, seconds, on


def rate(k, a, batch, fixed, steps=1500, seed=0):
    tokens, seconds, on = simulate(DraftPolicy(k, fixed=fixed), k, steps, batch, lambda t: a, cost_model(k),
                                   random.Random(seed))
    return tokens / seconds, sum(on) / steps


def test_expected_tokens_is_the_geometric_sum():
    k, a = 3, random.uniform(0.2, 0.9)
    policy, rng = DraftPolicy(k), random.Random(1)
    for _ in range(4000):
        n = 0
        while n < k and rng.random() < a:
            n += 1
        policy.observe_acceptance(k, n)
    policy.decide(1)                                            # folds the counts
    assert all(abs(x - a) < 0.05 for x in policy.acceptance()), (a, policy.acceptance())
    assert abs(policy.expected_tokens() - (1 - a ** (k + 1)) / (1 - a)) < 0.1


@pytest.mark.parametrize("k", [1, 3])
def test_adaptive_is_never_worse_than_plain_and_near_the_better_mode(k):
    """Over acceptance 0..0.85 and batch 1..128 (drafting wins at small batch and high acceptance,
    loses at large batch or low acceptance): >= 0.97 of plain decoding and of always drafting."""
    wins = losses = 0
    for a in (0.0, 0.3, 0.85):
        for batch in (1, 8, 32, 128):
            plain, _ = rate(k, a, batch, False)
            always, _ = rate(k, a, batch, True)
            adaptive, on = rate(k, a, batch, None)
            assert adaptive >= 0.97 * max(plain, always), (a, batch, adaptive / plain, always / plain)
            wins += always > 1.05 * plain and on > 0.9
            losses += always < 0.95 * plain and on < 0.1
    assert wins >= 4 and losses >= 4        # it really switched both ways across the grid


def test_turns_off_at_low_acceptance_and_back_on_when_it_recovers():
    k, batch = 2, 4
    a = lambda t: 0.05 if t < 600 else 0.9                                         # noqa: E731
    _, _, on = simulate(DraftPolicy(k), k, 2000, batch, a, cost_model(k), random.Random(2))
    assert sum(on[300:600]) < 0.1 * 300                          # off, but for probes
    assert any(on[300:600])                                      # ... which do happen
    assert sum(on[1200:]) > 0.9 * 800                            # back on after acceptance recovered


def test_turns_off_for_large_batches_only():
    """One policy, the batch moving between 1 and 64: each size gets its own costs (and its own answer)."""
    k, cost, policy, rng = 3, cost_model(3), DraftPolicy(3), random.Random(3)
    choices = {1: [], 64: []}
    drafted = False
    for t in range(3000):
        batch = 1 if (t // 200) % 2 == 0 else 64
        d = policy.decide(batch)
        choices[batch].append(d)
        if drafted:
            for _ in range(batch):
                policy.observe_acceptance(k, sum(1 for _ in range(k) if rng.random() < 0.5) and 1)
        if drafted == d:
            policy.observe_step(d, batch, cost(drafted, d, batch))
        drafted = d
    assert sum(choices[1]) > 0.8 * len(choices[1]) and sum(choices[64]) < 0.2 * len(choices[64])


def test_hysteresis_and_fixed_policies():
    policy = DraftPolicy(1, margin=0.05, probe_every=1000, max_probe_every=1000)   # no probes here
    policy.observe_step(True, 1, 1.0)
    policy.observe_step(False, 1, 1.0)
    policy.accepted, policy.tested = [2.0], [100.0]              # gain 1.02: inside the margin
    flips, last = 0, None
    for _ in range(30):
        d = policy.decide(1)
        flips += last is not None and d != last
        last = d
    assert flips == 0 and last                                   # kept drafting
    policy.accepted = [0.0]                                      # gain 1.0 - 0: still inside
    assert policy.decide(1)
    policy.costs[(1, True)] = 1.2                                # gain 0.83: off
    assert not policy.decide(1)
    policy.costs[(1, True)] = 0.99                               # gain 1.01: not enough to come back
    assert not policy.decide(1)
    assert DraftPolicy(2, fixed=True).decide(64) and not DraftPolicy(2, fixed=False).decide(1)


# -- the engine -------------------------------------------------------------------------------------

class Scripted(DraftPolicy):
    """Drafts on, off, off, on, then as a seeded coin says: the engine meets every switch and run."""

    def __init__(self, k, seed):
        super().__init__(k)
        self.rng, self.decisions = random.Random(seed), []

    def decide(self, batch):
        start = (True, False, False, True)
        n = len(self.decisions)
        self.decisions.append(start[n] if n < len(start) else self.rng.random() < 0.5)
        return self.decisions[-1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("m") / "tiny", tiny_config(vocab_size=96), seed=5, std=0.3)
    return path


@pytest.mark.parametrize("k", [1, 3])
def test_switching_drafting_on_and_off_keeps_greedy_output_and_caches(ckpt, monkeypatch, k):
    seed = random.randrange(2**31)
    plain = LLM(ckpt, backend="cpu", **{"kv_cache.block_size": 4})
    spec = LLM(ckpt, backend="cpu", **{"kv_cache.block_size": 4, "speculative.method": "mtp",
                                       "speculative.num_draft_tokens": k})
    prompts = random_prompts(96, [5, 12, 2], seed)
    want, _ = plain.generate_ids(prompts, max_new_tokens=24, ignore_eos=True)
    for policy in (Scripted(k, seed), "adaptive"):
        spec.engine.policy = policy if isinstance(policy, DraftPolicy) else DraftPolicy(k)
        got, _ = spec.generate_ids(prompts, max_new_tokens=24, ignore_eos=True)       # the real MTP drafts
        assert got == want, (policy, seed)
    # oracle drafts, some wrong, while the coin turns drafting on and off; then the caches
    oracle_drafts(monkeypatch, {tuple(p): w for p, w in zip(prompts, want)}, 0.3, random.Random(seed))
    eng = spec.engine
    eng.policy = Scripted(k, seed + 1)
    eng.stats.spec.__init__()
    seqs = [eng.add(p, SamplingParams(max_new_tokens=24, ignore_eos=True)) for p in prompts]
    for _ in range(6):                   # 1 + 5 x (k + 1) tokens at most: none finishes
        eng.step()
    assert True in eng.policy.decisions and False in eng.policy.decisions
    assert 0 < sum(eng.stats.spec.accepted) < sum(eng.stats.spec.proposed)
    for seq, w in zip(seqs, want):
        assert not seq.finished and seq.output_ids == w[: len(seq.output_ids)]
        assert_cache_matches_a_fresh_pass(plain, spec.cache, seq)   # drafting or not in between
    eng.run_to_completion()
    assert [s.output_ids for s in seqs] == want
