"""The model runner: one step's plan in, each sequence's new token ids out.

It builds the flat batch, runs the model (or a backend's CUDA-graph replay of it), gathers the
logits rows the step needs, samples the whole batch on the device (SamplingBatch), verifies
speculative drafts on the device (speculative.verify), and brings the chosen ids to the host with
one device->host copy. It changes no sequence: the engine applies what it returns, so a step that
fails can be run again, per sequence (its cache writes lie past every num_cached and are
rewritten later).

Before sampling, the rows' logits are edited on the device (LogitsProcessing: penalties, logit_bias,
min_tokens; then the grammar bitmask). Logprobs (of the chosen token and the top alternatives, of
the distribution sampled from) and prompt logprobs ride in the same single copy: when a step has
any, the whole copy is one float32 tensor (token ids < 2**24 are exact in it). The choices of an
n > 1 request that wait on a leader's prompt (Sequence.followers) are sampled from the leader's
last row in the step that completes its prompt, each with its own seed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dsv3.core.batch import Batch
from dsv3.core.grammar import apply_bitmask
from dsv3.core.sampling import LogitsProcessing, SamplingBatch
from dsv3.core.speculative import verify

# (logprob of the token, ids of the top alternatives, their logprobs), per token
LogprobEntry = tuple[float, list[int], list[float]]


@dataclass
class StepResult:
    plan: list[tuple]                      # (sequence, chunk) as scheduled
    batch: Batch
    hidden: torch.Tensor                   # [T, D] final hidden states (the drafter reads them)
    tokens: list[list[int]]                # per planned sequence: ids to append (empty mid-prompt)
    accepted: list[int | None]             # per planned sequence: drafts accepted (None: no drafts)
    logprobs: list[list | None] = field(default_factory=list)         # per planned sequence: a LogprobEntry per token
    prompt_logprobs: list[list | None] = field(default_factory=list)  # per planned sequence: entries of prompt tokens
    forks: list[tuple] = field(default_factory=list)   # (plan index of the leader, follower, tokens, logprob entries)
    # host seconds in: building the batch, enqueueing forward + sampling, the device->host read (the wait for
    # the device); EngineStats.phases sums them per step
    phases: tuple[float, float, float] = (0.0, 0.0, 0.0)


class ModelRunner:
    def __init__(self, model, cache, forward=None):
        self.model, self.cache = model, cache
        self.forward = forward or model    # forward(batch, caches) -> hidden; e.g. CUDA-graph replay
        self.device = cache.layers[0].device

    def run(self, plan: list[tuple]) -> StepResult:
        t0 = time.perf_counter()
        batch = Batch.build([c for _, c in plan], self.cache.block_size, self.device)
        t1 = time.perf_counter()
        hidden = self.forward(batch, self.cache.layers)
        # rows whose logits are needed: the last row of a finished prompt or a decode, every row of a
        # verify chunk [last, d_1..d_k]; a prompt chunk that does not finish the prompt needs none
        plain, verifying = [], []
        for i, (s, c) in enumerate(plan):
            if s.drafts:
                verifying.append(i)
            elif s.num_cached + len(c.token_ids) == len(s.token_ids):
                plain.append(i)
        followers = [(i, f) for i in plain for f in plan[i][0].followers]     # n > 1: from the leader's row
        sampled = [plan[i][0] for i in plain] + [f for _, f in followers]
        # prompt positions whose next token's logprob was asked for (echo), each scored once
        scored = []                                                              # (plan index, first position, rows)
        for i, (s, c) in enumerate(plan):
            if s.params.prompt_logprobs is not None:
                first, last = max(c.start, len(s.prompt_logprobs)), min(c.start + len(c.token_ids), s.prompt_len - 1)
                if first < last:
                    scored.append((i, first, batch.token_rows[i][first - c.start: last - c.start]))
        rows = ([batch.token_rows[i][-1] for i in plain] + [batch.token_rows[i][-1] for i, _ in followers]
                + [r for i in verifying for r in batch.token_rows[i]] + [r for *_, rs in scored for r in rs])
        tokens: list[list[int]] = [[] for _ in plan]
        accepted: list[int | None] = [None] * len(plan)
        if not rows:
            return StepResult(plan, batch, hidden, tokens, accepted, [None] * len(plan), [None] * len(plan),
                              phases=(t1 - t0, time.perf_counter() - t1, 0.0))
        logits = self.model.logits(hidden[rows])                                 # [R, V] float32
        picks, floats, lp_rows, lp_width = [], [], [], 0
        if sampled:
            part = logits[: len(sampled)]
            processing = LogitsProcessing.build(sampled, self.model.cfg.eos_token_ids, self.device)
            if processing is not None:
                processing.apply(part)                                           # penalties, logit_bias, min_tokens
            apply_bitmask(part, [s.grammar for s in sampled])                    # structured output's rows
            sampler = SamplingBatch([s.params for s in sampled], [s.seed for s in sampled],
                                    [len(s.token_ids) for s in sampled], self.device)
            lp_rows = [j for j, s in enumerate(sampled) if s.params.logprobs is not None]
            if lp_rows:          # logprobs: the chosen token's, and the top lp_width, of what was sampled from
                lp_width = max(sampled[j].params.logprobs for j in lp_rows)
                index = torch.tensor(lp_rows, dtype=torch.int64, device=self.device)
                chosen, lp = sampler.sample_with_log_probs(part, index)            # [Bp], [W, V]
                floats.append(lp.gather(1, chosen[index][:, None])[:, 0])
                if lp_width:
                    top = lp.topk(lp_width, dim=-1)
                    floats += [top.values.flatten(), top.indices.flatten().float()]
            else:
                chosen = sampler.sample(part)                                    # [Bp]
            picks.append(chosen)
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
        sc_width = max((plan[i][0].params.prompt_logprobs for i, *_ in scored), default=0)
        if scored:
            start = len(rows) - sum(len(rs) for *_, rs in scored)
            actual = torch.tensor([plan[i][0].token_ids[p + 1] for i, first, rs in scored
                                   for p in range(first, first + len(rs))], dtype=torch.int64, device=self.device)
            lp = logits[start:].float().log_softmax(-1)                           # the model's own distribution
            floats.append(lp.gather(1, actual[:, None])[:, 0])
            if sc_width:
                top = lp.topk(sc_width, dim=-1)
                floats += [top.values.flatten(), top.indices.flatten().float()]
        num_ids = sum(p.numel() for p in picks)
        t2 = time.perf_counter()
        if floats:        # token ids travel as float32 with the logprobs: exact below 2**24
            host = torch.cat([p.float() for p in picks] + floats).tolist()     # the step's one device->host copy
            ids = [int(x) for x in host[:num_ids]]
        else:
            host = ids = torch.cat(picks).tolist()                               # the step's one device->host copy
        phases = (t1 - t0, t2 - t1, time.perf_counter() - t2)
        for j, i in enumerate(plain):
            tokens[i] = [ids[j]]
        if verifying:
            k1 = len(plan[verifying[0]][0].drafts) + 1
            base = len(sampled)
            flat, counts = ids[base: base + len(verifying) * k1], ids[base + len(verifying) * k1:]
            for j, i in enumerate(verifying):
                accepted[i] = counts[j]
                tokens[i] = flat[j * k1: j * k1 + counts[j] + 1]
        off = num_ids
        entries: dict[int, LogprobEntry] = {}
        if lp_rows:
            entries, off = self._entries(host, off, lp_rows, [sampled[j].params.logprobs for j in lp_rows], lp_width)
        logprobs: list[list | None] = [None] * len(plan)
        for j, i in enumerate(plain):
            if j in entries:
                logprobs[i] = [entries[j]]
        prompt_logprobs: list[list | None] = [None] * len(plan)
        if scored:
            n = sum(len(rs) for *_, rs in scored)
            scores, off = self._entries(host, off, list(range(n)), [sc_width] * n, sc_width)
            k = 0
            for (i, _, rs) in scored:
                wanted = plan[i][0].params.prompt_logprobs
                prompt_logprobs[i] = [(lp, top[:wanted], vals[:wanted]) for lp, top, vals in
                                      (scores[k + r] for r in range(len(rs)))]
                k += len(rs)
        forks = [(i, f, [ids[len(plain) + j]], [entries[len(plain) + j]] if len(plain) + j in entries else None)
                 for j, (i, f) in enumerate(followers)]
        return StepResult(plan, batch, hidden, tokens, accepted, logprobs, prompt_logprobs, forks, phases)

    @staticmethod
    def _entries(host: list, off: int, rows: list[int], wanted: list[int], width: int):
        """Read back [chosen logprobs, top values, top ids] of `rows` from the copy: ({row: LogprobEntry},
        the offset after them)."""
        n = len(rows)
        chosen = host[off: off + n]
        values = host[off + n: off + n + n * width]
        ids = host[off + n + n * width: off + n + 2 * n * width]
        out = {r: (chosen[k], [int(t) for t in ids[k * width: k * width + w]], values[k * width: k * width + w])
               for k, (r, w) in enumerate(zip(rows, wanted))}
        return out, off + n + 2 * n * width
