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
from dsv3.core.sampling import SamplingParams, target_probs


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


def accept(logits: torch.Tensor, drafts: list[int], draft_probs: list[torch.Tensor] | None,
           params: SamplingParams, generator: torch.Generator | None) -> tuple[list[int], int]:
    """logits [k+1, V] from verifying [last, d_1..d_k] -> (tokens to append, number of drafts accepted)."""
    k = len(drafts)
    if params.greedy:
        best = logits.argmax(-1).tolist()
        a = 0
        while a < k and drafts[a] == best[a]:
            a += 1
        return drafts[:a] + [best[a]], a
    p = target_probs(logits, params).cpu()                                     # [k+1, V]
    for j, d in enumerate(drafts):
        q = draft_probs[j]
        if torch.rand((), generator=generator) * q[d] < p[j, d]:              # accept w.p. min(1, p/q)
            continue
        residual = (p[j] - q).clamp_min(0)
        residual = residual if residual.sum() > 0 else p[j]
        return drafts[:j] + [int(torch.multinomial(residual / residual.sum(), 1, generator=generator))], j
    return drafts + [int(torch.multinomial(p[k], 1, generator=generator))], k


class MTPDrafter:
    """Runs the MTP layer over verified positions and proposes k drafts per sequence."""

    def __init__(self, model, cache, num_draft_tokens: int, mtp_hidden=None):
        self.model, self.cache, self.k = model, cache, num_draft_tokens
        self.mtp_hidden = mtp_hidden or model.mtp_hidden   # e.g. CUDA-graph replay of the MTP layer

    def draft(self, work: list[tuple], device) -> None:
        """work: (sequence, first new verified position s, end e, main hidden rows [e - s, D]).

        MTP slot i consumes (h_i, t_{i+1}); slots s..e-1 are computed here with the true hidden
        states, then k-1 more slots with the MTP layer's own output. Sets seq.drafts / draft_probs.
        """
        chunks = [Chunk(seq.token_ids[s + 1: e + 1], s, list(seq.blocks), decode=s > 0 and e - s <= self.k + 1)
                  for seq, s, e, _ in work]
        batch = Batch.build(chunks, self.cache.block_size, device)
        prev = torch.empty(batch.input_ids.shape[0], work[0][3].shape[-1], dtype=work[0][3].dtype, device=device)
        for rows, (_, _, _, hidden) in zip(batch.token_rows, work):
            prev[rows] = hidden
        h = self.mtp_hidden(batch.input_ids, prev, batch, self.cache.layers)
        last = h[batch.last_rows]                                               # [B, D]
        for seq, *_ in work:
            seq.drafts, seq.draft_probs = [], []
        for j in range(self.k):
            logits = self.model.mtp.logits(last)                                # [B, V]
            for row, (seq, *_) in enumerate(work):
                self._propose(seq, logits[row])
            if j == self.k - 1:
                break
            chunks = [Chunk([seq.drafts[-1]], e + j, list(seq.blocks), decode=True) for seq, s, e, _ in work]
            batch = Batch.build(chunks, self.cache.block_size, device)
            last = self.mtp_hidden(batch.input_ids, last, batch, self.cache.layers)

    @staticmethod
    def _propose(seq, logits: torch.Tensor) -> None:
        if seq.params.greedy:
            seq.drafts.append(int(logits.argmax()))
            return
        q = target_probs(logits, seq.params).cpu()   # drafts are filtered like the target (top-k/top-p)
        seq.drafts.append(int(torch.multinomial(q, 1, generator=seq.generator)))
        seq.draft_probs.append(q)
