"""The engine: sequences in, tokens out, one flat batch per step.

step() = schedule (decodes first, then prompt chunks up to the token budget: chunked prefill),
run the model, sample, post-process (EOS, max tokens, stop strings, context limit).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from dsv3.core.batch import Batch, Chunk
from dsv3.core.cache import LatentCache
from dsv3.core.errors import RequestError
from dsv3.core.model import DeepseekV3
from dsv3.core.sampling import SamplingParams, sample
from dsv3.core.speculative import MTPDrafter, SpecStats, accept
from dsv3.core.tokenizer import Tokenizer

_ids = itertools.count()


@dataclass
class Sequence:
    token_ids: list[int]
    prompt_len: int
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    generator: torch.Generator | None = None
    finish_reason: str | None = None   # "stop" (EOS or stop string), "length"
    text: str = ""                     # detokenised output, cut at a stop string
    emitted: int = 0                   # characters of `text` already streamed
    drafts: list[int] = field(default_factory=list)   # MTP proposals for the positions after the last token
    draft_probs: list = field(default_factory=list)   # their draft distributions (sampling only)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepOutput:
    seq: Sequence
    delta: str          # new text safe to show (held back while it may start a stop string)
    finished: bool
    new_tokens: list[int] = field(default_factory=list)


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    spec: SpecStats = field(default_factory=SpecStats)

    def summary(self) -> str:
        rate = self.generated_tokens / self.seconds if self.seconds else 0.0
        text = (f"{self.generated_tokens} tokens generated in {self.seconds:.2f} s ({rate:.1f} tok/s), "
                f"{self.prefill_tokens} prompt tokens, {self.steps} steps")
        return text + (f"; {self.spec.summary()}" if self.spec.verify_steps else "")


class Engine:
    def __init__(self, model: DeepseekV3, cache: LatentCache, tokenizer: Tokenizer | None = None,
                 max_batch_tokens: int = 2048, runner=None, num_draft_tokens: int = 0):
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.runner = runner or model   # runner(batch, caches) -> hidden; e.g. CUDA-graph replay
        self.max_batch_tokens = max_batch_tokens
        self.max_context = model.cfg.max_position_embeddings
        self.running: list[Sequence] = []
        self.device = cache.layers[0].device
        self.stats = EngineStats()
        self.drafter = MTPDrafter(model, cache, num_draft_tokens) if num_draft_tokens else None
        if self.drafter and not model.has_mtp:
            raise RequestError("speculative decoding with MTP needs the checkpoint's MTP layer "
                               "(num_nextn_predict_layers = 1 and its tensors); this model has none")

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        if not prompt_ids:
            raise RequestError("empty prompt: give at least one token")
        if len(prompt_ids) >= self.max_context:
            raise RequestError(f"prompt is {len(prompt_ids)} tokens but the model's context is "
                               f"{self.max_context} (max_position_embeddings); shorten the prompt")
        gen = None
        if not params.greedy:
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                else int(torch.randint(0, 2**62, ())))
        seq = Sequence(list(prompt_ids), len(prompt_ids), params, generator=gen)
        self.running.append(seq)
        return seq

    def has_work(self) -> bool:
        return bool(self.running)

    def release(self, seq: Sequence) -> None:
        self.cache.allocator.free(seq.blocks)
        seq.blocks = []
        if seq in self.running:
            self.running.remove(seq)

    def schedule(self) -> list[tuple[Sequence, Chunk]]:
        plan, budget = [], self.max_batch_tokens
        decoding = [s for s in self.running if s.num_cached == len(s.token_ids) - 1]
        prefilling = [s for s in self.running if s.num_cached < len(s.token_ids) - 1]
        for s in decoding + prefilling:
            tokens = s.token_ids[s.num_cached:] + s.drafts
            n = min(len(tokens), budget)
            if n <= 0 or (s.drafts and n < len(tokens)):
                break
            self.cache.grow(s.blocks, s.num_cached + n)
            plan.append((s, Chunk(tokens[:n], s.num_cached, list(s.blocks),
                                  decode=s.num_cached > 0 and s in decoding)))
            budget -= n
        return plan

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        plan = self.schedule()
        if not plan:
            return []
        t0 = time.perf_counter()
        batch = Batch.build([c for _, c in plan], self.cache.block_size, self.device)
        hidden = self.runner(batch, self.cache.layers)
        # rows whose logits are needed: every row of a verify chunk, the last row of a finished prompt
        needed = []
        for i, (s, c) in enumerate(plan):
            if s.drafts:
                needed.append(batch.token_rows[i])
            elif s.num_cached + len(c.token_ids) == len(s.token_ids):
                needed.append(batch.token_rows[i][-1:])
            else:
                needed.append([])
        flat = [r for rows in needed for r in rows]
        logits = self.model.logits(hidden[flat]) if flat else None
        outputs, drafting, offset = [], [], 0
        for i, (s, c) in enumerate(plan):
            rows, start = needed[i], s.num_cached
            if s.drafts:                                   # verify [last, d_1..d_k]
                tokens, a = accept(logits[offset: offset + len(rows)], s.drafts, s.draft_probs, s.params, s.generator)
                self.stats.spec.record(len(s.drafts), a)
                s.num_cached += a + 1                       # roll back: positions after the accepted drafts are void
            elif rows:
                tokens = [sample(logits[offset], s.params, s.generator)]
                s.num_cached += len(c.token_ids)
            else:                                          # a prompt chunk that does not finish the prompt
                tokens = []
                s.num_cached += len(c.token_ids)
            offset += len(rows)
            s.drafts, s.draft_probs = [], []
            out = self._append_all(s, tokens)
            if out is not None:
                outputs.append(out)
            if self.drafter and not s.finished:
                drafting.append((s, start, s.num_cached, hidden[batch.token_rows[i][: s.num_cached - start]]))
        if drafting:
            room = [(s, a, e, h) for s, a, e, h in drafting if e + self.drafter.k < self.max_context]
            for s, *_ in room:
                self.cache.grow(s.blocks, s.num_cached + self.drafter.k + 1)
            if room:
                self.drafter.draft(room, self.device)
        self.stats.steps += 1
        self.stats.prefill_tokens += sum(len(c.token_ids) for _, c in plan if not c.decode)
        self.stats.generated_tokens += sum(len(o.new_tokens) for o in outputs)
        self.stats.seconds += time.perf_counter() - t0
        return outputs

    def _append_all(self, s: Sequence, tokens: list[int]) -> StepOutput | None:
        """Append this step's tokens (one, or several after speculative verification) and post-process."""
        if not tokens:
            return None
        before = len(s.output_ids)
        p = s.params
        for token in tokens:
            if not p.ignore_eos and token in self.model.cfg.eos_token_ids:
                s.finish_reason = "stop"       # EOS ends the text; it is not part of it
                break
            s.token_ids.append(token)
            if len(s.output_ids) >= p.max_new_tokens or len(s.token_ids) >= self.max_context:
                s.finish_reason = "length"
                break
        delta = self._detokenize(s)
        if s.finished:
            self.release(s)
        return StepOutput(s, delta, s.finished, s.output_ids[before:])

    def _detokenize(self, s: Sequence) -> str:
        """Update s.text; return the newly visible part. Stops at (and drops) the first stop string."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(s.output_ids)
        hits = [text.find(stop) for stop in s.params.stop if stop and stop in text]
        if hits:
            text, s.finish_reason = text[: min(hits)], "stop"
        if not s.finished:
            if text.endswith("\ufffd"):          # an incomplete UTF-8 sequence: wait for its next byte
                text = text.rstrip("\ufffd")
            hold = max((k for stop in s.params.stop for k in range(1, len(stop))
                        if text.endswith(stop[:k])), default=0)
            text = text[: len(text) - hold]
        s.text = text if s.finished or len(text) > len(s.text) else s.text
        delta, s.emitted = s.text[s.emitted:], max(s.emitted, len(s.text))
        return delta

    def run_to_completion(self, on_output=None) -> None:
        while self.has_work():
            for out in self.step():
                if on_output is not None:
                    on_output(out)
