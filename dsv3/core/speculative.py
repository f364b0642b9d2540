"""Speculative decoding with DeepSeek-V3's MTP module.

Each step the main model verifies [last token + k drafts] in one forward (a multi-token decode
chunk). Greedy requests accept drafts while they equal the target's argmax; sampled requests use
rejection sampling (accept d with probability min(1, p(d)/q(d)), else sample from max(0, p - q)),
which leaves the target distribution unchanged. Either way one more token (the correction, or a
bonus when all drafts pass) comes from the target. Rejected positions are rolled back by moving the
sequence's cached length; their cache slots are simply overwritten later.

The MTP layer then runs over every newly verified position i with (h_i, t_{i+1}) -> draft for
t_{i+2}; for k > 1 it is applied again to its own output, as vLLM and SGLang do.
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

    def draft(self, work: list[tuple], device) -> None:
        """work: (sequence, first new verified position s, end e, main hidden rows [e - s, D]).

        MTP slot i consumes (h_i, t_{i+1}); slots s..e-1 are computed here with the true hidden
        states, then k-1 more slots with the MTP layer's own output. Sets seq.drafts (one
        device->host copy for all of them) and seq.draft_probs ([k, V] on the device, sampling only).
        """
        chunks = [Chunk(seq.token_ids[s + 1: e + 1], s, list(seq.blocks), decode=s > 0 and e - s <= self.k + 1)
                  for seq, s, e, _ in work]
        batch = Batch.build(chunks, self.cache.block_size, device)
        prev = torch.empty(batch.input_ids.shape[0], work[0][3].shape[-1], dtype=work[0][3].dtype, device=device)
        for rows, (_, _, _, hidden) in zip(batch.token_rows, work):
            prev[rows] = hidden
        h = self.mtp_hidden(batch.input_ids, prev, batch, self.cache.layers)
        last = h[batch.last_rows]                                               # [B, D]
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
