"""The model runner: one step's plan in, each sequence's new token ids out.

It builds the flat batch, runs the model (or a backend's CUDA-graph replay of it), gathers the
logits rows the step needs, samples the whole batch on the device (SamplingBatch), verifies
speculative drafts on the device (speculative.verify), and brings the chosen ids to the host with
one device->host copy. It changes no sequence: the engine applies what it returns, so a step that
fails can be run again, per sequence (its cache writes lie past every num_cached and are
rewritten later).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.core.batch import Batch
from dsv3.core.grammar import apply_bitmask
from dsv3.core.sampling import SamplingBatch
from dsv3.core.speculative import verify


@dataclass
class StepResult:
    plan: list[tuple]                      # (sequence, chunk) as scheduled
    batch: Batch
    hidden: torch.Tensor                   # [T, D] final hidden states (the drafter reads them)
    tokens: list[list[int]]                # per planned sequence: ids to append (empty mid-prompt)
    accepted: list[int | None]             # per planned sequence: drafts accepted (None: no drafts)


class ModelRunner:
    def __init__(self, model, cache, forward=None):
        self.model, self.cache = model, cache
        self.forward = forward or model    # forward(batch, caches) -> hidden; e.g. CUDA-graph replay
        self.device = cache.layers[0].device

    def run(self, plan: list[tuple]) -> StepResult:
        batch = Batch.build([c for _, c in plan], self.cache.block_size, self.device)
        hidden = self.forward(batch, self.cache.layers)
        # rows whose logits are needed: the last row of a finished prompt or a decode, every row of a
        # verify chunk [last, d_1..d_k]; a prompt chunk that does not finish the prompt needs none
        plain, verifying = [], []
        for i, (s, c) in enumerate(plan):
            if s.drafts:
                verifying.append(i)
            elif s.num_cached + len(c.token_ids) == len(s.token_ids):
                plain.append(i)
        rows = [batch.token_rows[i][-1] for i in plain] + [r for i in verifying for r in batch.token_rows[i]]
        tokens: list[list[int]] = [[] for _ in plan]
        accepted: list[int | None] = [None] * len(plan)
        if not rows:
            return StepResult(plan, batch, hidden, tokens, accepted)
        logits = self.model.logits(hidden[rows])                                 # [R, V] float32
        picks = []
        if plain:
            seqs = [plan[i][0] for i in plain]
            apply_bitmask(logits[: len(plain)], [s.grammar for s in seqs])       # structured output's rows
            sampler = SamplingBatch([s.params for s in seqs], [s.seed for s in seqs],
                                    [len(s.token_ids) for s in seqs], self.device)
            picks.append(sampler.sample(logits[: len(plain)]))                   # [Bp]
        if verifying:
            seqs = [plan[i][0] for i in verifying]
            k = len(seqs[0].drafts)
            drafts = torch.tensor([s.drafts for s in seqs], dtype=torch.int64, device=self.device)
            probs = None if all(s.draft_probs is None for s in seqs) else torch.stack([
                s.draft_probs if s.draft_probs is not None else torch.zeros(k, logits.shape[-1], device=self.device)
                for s in seqs])
            sampler = SamplingBatch([s.params for s in seqs], [s.seed for s in seqs],
                                    [len(s.token_ids) for s in seqs], self.device)
            chosen, n_accepted = verify(logits[len(plain):].view(len(seqs), k + 1, -1), drafts, probs, sampler)
            picks += [chosen.flatten(), n_accepted]
        host = torch.cat(picks).tolist()                                        # the step's one device->host copy
        for j, i in enumerate(plain):
            tokens[i] = [host[j]]
        if verifying:
            k1 = len(plan[verifying[0]][0].drafts) + 1
            flat, counts = host[len(plain): len(plain) + len(verifying) * k1], host[len(plain) + len(verifying) * k1:]
            for j, i in enumerate(verifying):
                accepted[i] = counts[j]
                tokens[i] = flat[j * k1: j * k1 + counts[j] + 1]
        return StepResult(plan, batch, hidden, tokens, accepted)
