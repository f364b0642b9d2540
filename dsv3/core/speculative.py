"""Speculative decoding with DeepSeek-V3's MTP module.

Each step the main model verifies [last token + k drafts] in one forward (a multi-token decode
chunk). Greedy requests accept drafts while they equal the target's argmax; sampled requests use
rejection sampling (accept d with probability min(1, p(d)/q(d)), else sample from max(0, p - q)),
which leaves the target distribution unchanged. Either way one more token (the correction, or a
bonus when all drafts pass) comes from the target. Rejected positions are rolled back by moving the
sequence's cached length; their cache slots are simply overwritten later.

The MTP layer then runs over every newly verified position i with (h_i, t_{i+1}) -> draft for
t_{i+2}; for k > 1 it is applied again to its own output, as vLLM and SGLang do.

DraftPolicy decides per step whether drafting pays at the running batch size (it stops paying where
a verify step costs more than its accepted drafts bring). While it is off the MTP layer still runs
over the newly verified positions, without logits or drafts, so its cache stays whole and drafting
can resume at any step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv3.core.batch import Batch, Chunk
from dsv3.core.sampling import SamplingBatch


@dataclass
class SpecStats:
    proposed: list[int] = field(default_factory=list)   # per draft position j: drafts offered
    accepted: list[int] = field(default_factory=list)   # per draft position j: drafts accepted
    verify_steps: int = 0                               # sequence-steps that verified drafts
    emitted: int = 0                                    # tokens those steps produced

    def record(self, num_drafts: int, num_accepted: int) -> None:
        for lst in (self.proposed, self.accepted):
            lst.extend([0] * (num_drafts - len(lst)))
        for j in range(num_drafts):
            self.proposed[j] += 1
            self.accepted[j] += int(j < num_accepted)
        self.verify_steps += 1
        self.emitted += num_accepted + 1

    @property
    def acceptance(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per verify step (1 + accepted drafts), the speedup's upper bound."""
        return self.emitted / self.verify_steps if self.verify_steps else 0.0

    def summary(self) -> str:
        rates = ", ".join(f"{r:.1%}" for r in self.acceptance)
        return f"MTP acceptance per draft position [{rates}], mean accepted length {self.mean_accepted_length:.2f}"


def verify(logits: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None,
           batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify B chunks [last, d_1..d_k] at once on the device.

    logits [B, k+1, V] (row j predicts the token after d_j), drafts [B, k] int64, draft_probs
    [B, k, V] (the distributions the drafts were drawn from; None when every row is greedy), batch:
    the B rows' sampling parameters at the position of the first predicted token.
    Returns (tokens [B, k+1], accepted [B]): a row emits tokens[:accepted + 1].
    Greedy rows accept while the draft equals the argmax; the others accept d_j with probability
    min(1, p(d_j) / q(d_j)) and replace the first rejected draft by a draw from max(0, p - q) (from p
    after the last draft), which leaves the target distribution unchanged."""
    B, k1, vocab = logits.shape
    k = k1 - 1
    best = logits.argmax(-1)                                                    # [B, k+1]
    greedy_accepted = (drafts == best[:, :k]).long().cumprod(1).sum(1)         # [B]
    if batch.greedy_only:
        return best, greedy_accepted
    rows = batch.repeat(k1)
    p = rows.probs(logits.reshape(B * k1, vocab)).view(B, k1, vocab)
    q = torch.zeros_like(p) if draft_probs is None else torch.cat([draft_probs, torch.zeros_like(p[:, :1])], 1)
    d = torch.cat([drafts, torch.zeros_like(drafts[:, :1])], 1)                 # [B, k+1], the bonus slot padded
    p_d, q_d = p.gather(2, d[..., None])[..., 0], q.gather(2, d[..., None])[..., 0]
    r = rows.uniform(stream=1, width=1).view(B, k1)
    accepted_each = (r * q_d < p_d)[:, :k]                                      # [B, k]
    sampled_accepted = accepted_each.long().cumprod(1).sum(1)
    residual = (p - q).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)     # after the last draft: p itself
    replacement = rows.choose(residual.view(B * k1, vocab), stream=2).view(B, k1)
    position = torch.arange(k1, device=logits.device)[None, :]
    sampled = torch.where(position < sampled_accepted[:, None], d, replacement)
    greedy = batch.greedy[:, None]
    return (torch.where(greedy, best, sampled),
            torch.where(batch.greedy, greedy_accepted, sampled_accepted))


class MTPDrafter:
    """Runs the MTP layer over verified positions and proposes k drafts per sequence."""

    def __init__(self, model, cache, num_draft_tokens: int, mtp_hidden=None):
        self.model, self.cache, self.k = model, cache, num_draft_tokens
        self.mtp_hidden = mtp_hidden or model.mtp_hidden   # e.g. CUDA-graph replay of the MTP layer

    def _verified_pass(self, work: list[tuple], device) -> torch.Tensor:
        """MTP slots s..e-1 of every work item from the true hidden states: (h_i, t_{i+1}) at slot i.
        Returns each sequence's last MTP hidden state [B, D]."""
        chunks = [Chunk(seq.token_ids[s + 1: e + 1], s, list(seq.blocks), decode=s > 0 and e - s <= self.k + 1)
                  for seq, s, e, _ in work]
        batch = Batch.build(chunks, self.cache.block_size, device)
        prev = torch.empty(batch.input_ids.shape[0], work[0][3].shape[-1], dtype=work[0][3].dtype, device=device)
        for rows, (_, _, _, hidden) in zip(batch.token_rows, work):
            prev[rows] = hidden
        h = self.mtp_hidden(batch.input_ids, prev, batch, self.cache.layers)
        return h[batch.last_rows]

    def catch_up(self, work: list[tuple], device) -> None:
        """The MTP layer over the newly verified positions only (no logits, no drafts), for steps that
        do not draft: its cache stays whole, so the next step may draft again."""
        self._verified_pass(work, device)

    def draft(self, work: list[tuple], device) -> None:
        """work: (sequence, first new verified position s, end e, main hidden rows [e - s, D]).

        MTP slot i consumes (h_i, t_{i+1}); slots s..e-1 are computed here with the true hidden
        states, then k-1 more slots with the MTP layer's own output. Sets seq.drafts (one
        device->host copy for all of them) and seq.draft_probs ([k, V] on the device, sampling only).
        """
        last = self._verified_pass(work, device)                               # [B, D]
        # draft j predicts the token at position e + 1 + j
        rows = SamplingBatch([seq.params for seq, *_ in work], [seq.seed for seq, *_ in work],
                             [e + 1 for _, _, e, _ in work], device)
        drafts, probs = [], []
        for j in range(self.k):
            logits = self.model.mtp.logits(last)                                # [B, V]
            tokens, q = self._propose(work, rows.shifted(j), logits, j)
            drafts.append(tokens)
            if q is not None:
                probs.append(q)
            if j == self.k - 1:
                break
            chunks = [Chunk([0], e + j, list(seq.blocks), decode=True) for seq, s, e, _ in work]
            batch = Batch.build(chunks, self.cache.block_size, device)
            batch.input_ids = tokens                                            # stays on the device
            last = self.mtp_hidden(batch.input_ids, last, batch, self.cache.layers)
        host = torch.stack(drafts, 1).tolist()                                  # [B, k]
        assert len(probs) in (0, self.k)
        stacked = torch.stack(probs, 1) if probs else None                      # [B, k, V]
        for row, (seq, *_) in enumerate(work):
            seq.drafts = host[row]
            seq.draft_probs = None if stacked is None else stacked[row]

    @staticmethod
    def _propose(work: list[tuple], rows: SamplingBatch, logits: torch.Tensor, j: int):
        """Draft j of every sequence from the MTP logits [B, V]: (tokens [B], their distributions [B, V]
        or None when all rows are greedy). Drafts are filtered like the target (top-k / top-p)."""
        if rows.greedy_only:
            return logits.argmax(-1), None
        q = rows.probs(logits)
        return torch.where(rows.greedy, logits.argmax(-1), rows.choose(q, stream=3)), q


class DraftPolicy:
    """Whether the engine's next step drafts: adaptive (while drafting pays), or `fixed` on or off.

    Drafting pays when a verify step brings more tokens per second than a plain step's one:
    E / cost(verify step) > 1 / cost(plain step), at the running batch size. With k drafts and a_j
    the acceptance of draft j given that drafts before it were accepted, E = 1 + a_1 + a_1 a_2 + ...
    + a_1...a_k, which is (1 - a^(k+1)) / (1 - a) when every a_j = a. Each a_j is an EWMA over steps
    of accepted / tested drafts (the counts verification already returns); the costs are EWMAs of the
    wall time of decode-only steps that verified and drafted (drafting) or did neither (plain), per
    batch-size bucket (powers of two). Switching needs a lead of `margin` (hysteresis). So that the
    estimates of the mode not in use do not go stale (drafting turns back on when acceptance
    recovers), it runs for `probe_steps` steps (the first step after a switch does half of each, so it
    is not timed) after `probe_every` decisions at a bucket; the interval doubles after each probe
    that changes nothing, up to `max_probe_every`, and falls back when the choice changes, so probing
    costs little where one mode clearly wins. A bucket with a mode never timed runs that mode first
    (drafting, then plain), and drafting runs until `min_samples` first drafts have been tested, so
    that the first estimate of the acceptance is not a handful of drafts.

    Deterministic in what it is given; in a parallel run the engine gives it the ranks' mean step
    time, so every rank decides alike. Greedy output does not depend on the decisions (verification
    emits the target's argmax either way); sampled output keeps its distribution, but which steps
    drafted changes which random draws a seeded request makes, so token-exact reruns of seeded
    sampling need `always`.
    """

    def __init__(self, num_draft_tokens: int, fixed: bool | None = None, margin: float = 0.03, probe_every: int = 32,
                 max_probe_every: int = 512, probe_steps: int = 3, min_samples: int = 32,
                 acceptance_decay: float = 0.98, cost_decay: float = 0.8):
        self.k, self.fixed, self.margin = num_draft_tokens, fixed, margin
        self.probe_every, self.max_probe_every, self.probe_steps = probe_every, max_probe_every, probe_steps
        self.min_samples = min_samples
        self.acceptance_decay, self.cost_decay = acceptance_decay, cost_decay
        self.reset()

    def reset(self) -> None:
        """Forget every estimate (e.g. after warm-up, whose steps compile and capture)."""
        self.accepted = [0.0] * self.k        # per draft position: EWMA of drafts accepted
        self.tested = [0.0] * self.k          # ... and of drafts tested (every earlier one accepted)
        self._step_counts = [[0, 0] for _ in range(self.k)]   # this step's (accepted, tested)
        self.costs: dict[tuple[int, bool], float] = {}      # (bucket, drafting) -> seconds per step
        self.age: dict[int, int] = {}                       # per bucket: decisions since the last probe
        self.interval: dict[int, int] = {}                  # per bucket: decisions between probes
        self.preferred: dict[int, bool] = {}                # per bucket: the last choice outside probes
        self.drafting = True                                # the last choice outside probes
        self._probe: tuple[bool, int] = (True, 0)           # (mode, steps left)

    @property
    def adaptive(self) -> bool:
        return self.fixed is None

    @staticmethod
    def bucket(batch: int) -> int:
        return max(batch, 1).bit_length()                  # 1 | 2-3 | 4-7 | 8-15 | ...

    def observe_acceptance(self, num_drafts: int, num_accepted: int) -> None:
        """One sequence's verify step: the first num_accepted of its num_drafts drafts were accepted."""
        for j in range(min(num_drafts, self.k)):
            self._step_counts[j][0] += j < num_accepted
            self._step_counts[j][1] += j <= num_accepted

    def observe_step(self, drafting: bool, batch: int, seconds: float) -> None:
        """A decode-only step of `batch` sequences that verified and drafted (drafting) or did neither."""
        key = (self.bucket(batch), drafting)
        old = self.costs.get(key)
        self.costs[key] = seconds if old is None else self.cost_decay * old + (1 - self.cost_decay) * seconds

    def acceptance(self) -> list[float]:
        """a_j per draft position; 0.5 where nothing was tested yet."""
        return [a / n if n else 0.5 for a, n in zip(self.accepted, self.tested)]

    def expected_tokens(self) -> float:
        """Tokens a verify step emits on average: 1 + a_1 + a_1 a_2 + ..."""
        tokens, reach = 1.0, 1.0
        for a in self.acceptance():
            reach *= a
            tokens += reach
        return tokens

    def gain(self, batch: int) -> float | None:
        """Drafting's tokens per second over plain decoding's at this batch size; None until both are timed."""
        b = self.bucket(batch)
        spec, plain = self.costs.get((b, True)), self.costs.get((b, False))
        if spec is None or plain is None:
            return None
        return self.expected_tokens() * plain / spec

    def decide(self, batch: int) -> bool:
        """Once per step, before drafting: does this step draft for the next one (of ~`batch` sequences)?"""
        if self.fixed is not None:
            return self.fixed
        if any(n for _, n in self._step_counts):            # fold this step's acceptance into the EWMAs
            d = self.acceptance_decay
            for j, (a, n) in enumerate(self._step_counts):
                self.accepted[j] = d * self.accepted[j] + a
                self.tested[j] = d * self.tested[j] + n
            self._step_counts = [[0, 0] for _ in range(self.k)]
        mode, left = self._probe
        if left:
            self._probe = (mode, left - 1)
            return mode
        b = self.bucket(batch)
        gain = self.gain(batch)
        if gain is None:                                     # time the missing mode first
            return self._start_probe(b, (b, True) not in self.costs)
        if self.k and self.tested[0] < self.min_samples:     # too few drafts tested to judge them
            return True
        self.drafting = gain >= 1 - self.margin if self.drafting else gain > 1 + self.margin
        if self.preferred.get(b, self.drafting) != self.drafting:
            self.interval[b] = self.probe_every
        self.preferred[b] = self.drafting
        self.age[b] = self.age.get(b, 0) + 1
        if self.age[b] >= self.interval.get(b, self.probe_every):
            self.interval[b] = min(2 * self.interval.get(b, self.probe_every), self.max_probe_every)
            return self._start_probe(b, not self.drafting)
        return self.drafting

    def _start_probe(self, b: int, mode: bool) -> bool:
        self.age[b] = 0
        self._probe = (mode, self.probe_steps - 1)
        return mode
