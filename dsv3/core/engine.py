"""The engine: sequences in, tokens out, one flat batch per step.

step() = schedule (admit waiting sequences the cache can hold, then decodes first and prompt
chunks up to the token budget: chunked prefill), run the model, sample, post-process (EOS, max
tokens, stop strings, context limit).

Admission control: add() queues a sequence (up to `max_waiting`, then QueueFullError); a waiting
sequence joins the running batch when the cache has blocks for its whole prompt. When a running
sequence needs a block and none is free, the most recently admitted sequence is preempted: its
blocks are freed and it waits at the head of the queue to be recomputed (its computed blocks stay
in the prefix cache, so recomputation usually reuses them).

Prefix caching: full blocks of computed tokens are registered in the allocator under a key that
chains their token prefix; a new sequence whose prompt starts with registered blocks shares them
read-only and starts with num_cached = the shared length. With MTP speculation, the MTP layer's
slot i depends on token i + 1 as well, so a block's key then also covers the token after it.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from dsv3.core.batch import Batch, Chunk
from dsv3.core.cache import LatentCache, block_key
from dsv3.core.errors import RequestError
from dsv3.core.model import DeepseekV3
from dsv3.core.sampling import SamplingParams, sample
from dsv3.core.speculative import MTPDrafter, SpecStats, accept
from dsv3.core.tokenizer import Tokenizer

_ids = itertools.count()
log = logging.getLogger("dsv3.engine")


@dataclass
class Sequence:
    token_ids: list[int]
    prompt_len: int
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    generator: torch.Generator | None = None
    finish_reason: str | None = None   # "stop" (EOS or stop string), "length", "error" (see StepOutput)
    text: str = ""                     # detokenised output, cut at a stop string
    emitted: int = 0                   # characters of `text` already streamed
    drafts: list[int] = field(default_factory=list)   # MTP proposals for the positions after the last token
    draft_probs: list = field(default_factory=list)   # their draft distributions (sampling only)
    mtp_valid: int = 0                 # positions whose MTP-layer cache slot holds a verified result
    prefix_keys: list[bytes] = field(default_factory=list)   # prefix-cache keys of the leading full blocks
    num_prefix_cached: int = 0         # prompt tokens taken from the prefix cache at admission
    stop_scanned: int = 0              # characters of the text already searched for stop strings

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
    error: str | None = None   # set when this sequence failed (isolate_failures): what went wrong


def _stop_prefix_at_end(text: str, stop: str) -> int:
    """Length of the longest proper prefix of `stop` that `text` ends with (0 if none): the leftmost
    place in text's last len(stop) - 1 characters where the rest of text starts `stop`."""
    tail = text[max(0, len(text) - len(stop) + 1):] if len(stop) > 1 else ""
    i = tail.find(stop[0])
    while i >= 0:
        if stop.startswith(tail[i:]):
            return len(tail) - i
        i = tail.find(stop[0], i + 1)
    return 0


class QueueFullError(RequestError):
    """The waiting queue is at its bound; the request was not queued (a server answers 503)."""


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    prefix_cached_tokens: int = 0      # prompt tokens served from shared blocks instead of computed
    preemptions: int = 0

    spec: SpecStats = field(default_factory=SpecStats)

    def summary(self) -> str:
        rate = self.generated_tokens / self.seconds if self.seconds else 0.0
        text = (f"{self.generated_tokens} tokens generated in {self.seconds:.2f} s ({rate:.1f} tok/s), "
                f"{self.prefill_tokens} prompt tokens, {self.steps} steps")
        if self.prefix_cached_tokens:
            text += f", {self.prefix_cached_tokens} prompt tokens from the prefix cache"
        if self.preemptions:
            text += f", {self.preemptions} preemptions"
        return text + (f"; {self.spec.summary()}" if self.spec.verify_steps else "")


class Engine:
    def __init__(self, model: DeepseekV3, cache: LatentCache, tokenizer: Tokenizer | None = None,
                 max_batch_tokens: int = 2048, runner=None, num_draft_tokens: int = 0,
                 prefix_caching: bool = True, max_waiting: int | None = None):
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.runner = runner or model   # runner(batch, caches) -> hidden; e.g. CUDA-graph replay
        self.max_batch_tokens = max_batch_tokens
        self.max_context = model.cfg.max_position_embeddings
        self.prefix_caching = prefix_caching
        self.max_waiting = max_waiting      # None: unbounded (offline use queues everything at once)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in admission order: the last one is preempted first
        self.device = cache.layers[0].device
        self.stats = EngineStats()
        self.drafter = (MTPDrafter(model, cache, num_draft_tokens, getattr(self.runner, "mtp_hidden", None))
                        if num_draft_tokens else None)
        if self.drafter and not model.has_mtp:
            raise RequestError("speculative decoding with MTP needs the checkpoint's MTP layer "
                               "(num_nextn_predict_layers = 1 and its tensors); this model has none")
        k = num_draft_tokens if self.drafter else 0
        # Positions a step may write past its chunk: the next verify's k + 1 tokens and the drafter's
        # k - 1 chained MTP slots. Reserved when the chunk is scheduled, so drafting never allocates.
        self.reserve = k + 1 if k else 0
        self.tokens_per_decode = k + 1
        self._early: list[StepOutput] = []   # sequences finished while scheduling (cache exhausted)
        # A server sets this: a step that raises is retried one sequence at a time, and only the
        # sequences that fail alone end (finish_reason "error"). Offline callers see the exception.
        self.isolate_failures = False

    @property
    def capacity_tokens(self) -> int:
        return self.cache.num_blocks * self.cache.block_size

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        if not prompt_ids:
            raise RequestError("empty prompt: give at least one token")
        if len(prompt_ids) >= self.max_context:
            raise RequestError(f"prompt is {len(prompt_ids)} tokens but the model's context is "
                               f"{self.max_context} (max_position_embeddings); shorten the prompt")
        if self.cache.blocks_needed(len(prompt_ids) + 1 + self.reserve) > self.cache.num_blocks:
            raise RequestError(f"prompt is {len(prompt_ids)} tokens but the latent cache holds "
                               f"{self.capacity_tokens - 1 - self.reserve} prompt tokens at most; raise "
                               f"kv_cache.max_tokens (--max-cache-tokens) or shorten the prompt")
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting for the cache "
                                 f"(max_waiting = {self.max_waiting}); retry later")
        gen = None
        if not params.greedy:
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                else int(torch.randint(0, 2**62, ())))
        seq = Sequence(list(prompt_ids), len(prompt_ids), params, generator=gen)
        self.waiting.append(seq)
        return seq

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def release(self, seq: Sequence) -> None:
        """Drop a sequence (finished, or abandoned by its caller) and free its blocks now."""
        self._register_blocks(seq)
        self.cache.allocator.free(seq.blocks)
        seq.blocks = []
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # -- prefix cache -------------------------------------------------------------------------------
    def _key_span(self) -> int:
        """Tokens after a block that its cached content depends on: the MTP layer reads token i + 1."""
        return 1 if self.drafter else 0

    def _register_blocks(self, s: Sequence) -> None:
        """Register every newly complete block: all its slots (the MTP layer's too) hold results."""
        if not self.prefix_caching:
            return
        bs, span = self.cache.block_size, self._key_span()
        valid = min(s.num_cached, s.mtp_valid) if self.drafter else s.num_cached
        b = len(s.prefix_keys)
        while (b + 1) * bs <= valid and (b + 1) * bs + span <= len(s.token_ids) and b < len(s.blocks):
            key = block_key(s.prefix_keys[-1] if s.prefix_keys else b"", s.token_ids[b * bs: (b + 1) * bs + span])
            self.cache.allocator.register(s.blocks[b], key)
            s.prefix_keys.append(key)
            b += 1

    def _match_prefix(self, s: Sequence) -> tuple[list[int], list[bytes]]:
        """Registered blocks that hold the start of s; the last token is always left to compute,
        since its logits are needed and a shared block is never written."""
        if not self.prefix_caching:
            return [], []
        bs, span = self.cache.block_size, self._key_span()
        blocks, keys, parent = [], [], b""
        for b in range((len(s.token_ids) - 1) // bs):
            parent = block_key(parent, s.token_ids[b * bs: (b + 1) * bs + span])
            block = self.cache.allocator.lookup(parent)
            if block is None:
                break
            blocks.append(block)
            keys.append(parent)
        return blocks, keys

    # -- scheduling ---------------------------------------------------------------------------------
    def _admit(self, budget: int) -> list[Sequence]:
        """Move waiting sequences (first come, first served) into the running batch while the cache
        holds their whole prompt (allocated now) and the token budget one decode step for each."""
        alloc, admitted = self.cache.allocator, []
        while (self.waiting and budget > 0
               and (len(self.running) + 1) * self.tokens_per_decode <= self.max_batch_tokens):
            s = self.waiting[0]
            need = self.cache.blocks_needed(len(s.token_ids) + self.reserve)
            if need > self.cache.num_blocks:      # a preempted sequence that outgrew the whole cache
                self.waiting.popleft()
                self._early.append(self._finish(s, "length"))
                continue
            shared, keys = self._match_prefix(s)
            revived = sum(1 for b in shared if alloc.refcount(b) == 0)
            if need - len(shared) + revived > alloc.num_free:
                break
            for b in shared:
                alloc.share(b)
            self.waiting.popleft()
            s.blocks, s.prefix_keys = list(shared), keys
            self.cache.grow(s.blocks, len(s.token_ids) + self.reserve)
            s.num_cached = s.mtp_valid = s.num_prefix_cached = len(shared) * self.cache.block_size
            self.stats.prefix_cached_tokens += s.num_cached
            self.running.append(s)
            admitted.append(s)
            budget -= len(s.token_ids) - s.num_cached
        return admitted

    def _preempt(self, s: Sequence) -> None:
        """Free a running sequence's blocks and queue it first for recomputation."""
        self._register_blocks(s)
        self.cache.allocator.free(s.blocks)
        s.blocks, s.prefix_keys, s.num_cached, s.mtp_valid = [], [], 0, 0
        s.drafts, s.draft_probs = [], []
        self.running.remove(s)
        self.waiting.appendleft(s)
        self.stats.preemptions += 1

    def _finish(self, s: Sequence, reason: str) -> StepOutput:
        s.finish_reason = reason
        delta = self._detokenize(s)
        self.release(s)
        return StepOutput(s, delta, True, [])

    def schedule(self) -> list[tuple[Sequence, Chunk]]:
        """Running sequences first (decodes, then prompt chunks), growing their blocks and preempting
        the most recently admitted when the cache runs out; then, unless that happened, waiting
        sequences join with what is left of the cache and the token budget."""
        plan, budget, preempted = [], self.max_batch_tokens, False
        decoding = [s for s in self.running if s.num_cached == len(s.token_ids) - 1]
        prefilling = [s for s in self.running if s.num_cached < len(s.token_ids) - 1]
        order = decoding + prefilling
        i = 0
        while i < len(order):
            s = order[i]
            tokens = s.token_ids[s.num_cached:] + s.drafts
            n = min(len(tokens), budget)
            if n <= 0 or (s.drafts and n < len(tokens)):
                break
            need = s.num_cached + n + self.reserve
            while not self.cache.can_grow(s.blocks, need) and len(order) > i + 1:
                victim = max(order[i + 1:], key=self.running.index)   # the most recently admitted
                order.remove(victim)
                self._preempt(victim)
                preempted = True
            if not self.cache.can_grow(s.blocks, need):
                # Everything after s is preempted; what is left belongs to s and to sequences already
                # planned this step. s waits for them, or, alone, has outgrown the cache.
                order.pop(i)
                if plan:
                    self._preempt(s)
                    preempted = True
                else:
                    self._early.append(self._finish(s, "length"))
                continue
            self.cache.grow(s.blocks, need)
            plan.append((s, Chunk(tokens[:n], s.num_cached, list(s.blocks),
                                  decode=s.num_cached > 0 and s in decoding)))
            budget -= n
            i += 1
        # Admitting right after a preemption would hand the freed blocks to a newcomer and preempt
        # again next step (thrashing); the preempted sequence is first in the queue instead.
        for s in [] if preempted else self._admit(budget):
            n = min(len(s.token_ids) - s.num_cached, budget)
            if n <= 0:
                break
            plan.append((s, Chunk(s.token_ids[s.num_cached: s.num_cached + n], s.num_cached, list(s.blocks))))
            budget -= n
        return plan

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        plan = self.schedule()
        early, self._early = self._early, []
        if not plan:
            return early
        t0 = time.perf_counter()
        try:
            groups, failed = [self._compute(plan)], []
        except Exception:  # noqa: BLE001 - isolate below, or re-raise
            if not self.isolate_failures:
                raise
            log.exception("engine step over %d sequences failed; retrying each on its own", len(plan))
            groups, failed = self._compute_isolated(plan)
        outputs = failed + [out for g in groups for out in self._post_process(*g)]
        self.stats.steps += 1
        self.stats.prefill_tokens += sum(len(c.token_ids) for _, c in plan if not c.decode)
        self.stats.generated_tokens += sum(len(o.new_tokens) for o in outputs)
        self.stats.seconds += time.perf_counter() - t0
        return early + outputs

    def _compute(self, plan: list[tuple[Sequence, Chunk]]):
        """Run the model over the plan and choose each sequence's new tokens; changes no sequence, so a
        failed plan can be retried (its cache writes lie past every num_cached and are rewritten later).
        Returns (plan, batch, hidden [N, D], [(tokens, accepted drafts or None)] per planned sequence)."""
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
        chosen, offset = [], 0
        for (s, c), rows in zip(plan, needed):
            if s.drafts:                                   # verify [last, d_1..d_k]
                chosen.append(accept(logits[offset: offset + len(rows)], s.drafts, s.draft_probs, s.params,
                                     s.generator))
            elif rows:
                chosen.append(([sample(logits[offset], s.params, s.generator)], None))
            else:                                          # a prompt chunk that does not finish the prompt
                chosen.append(([], None))
            offset += len(rows)
        return plan, batch, hidden, chosen

    def _compute_isolated(self, plan):
        """After a failed step: each planned sequence alone, so one request that breaks an op (a bad
        kernel shape, a plugin that raises) fails on its own and the others go on."""
        groups, failed = [], []
        for item in plan:
            try:
                groups.append(self._compute([item]))
            except Exception as e:  # noqa: BLE001 - this sequence's own failure
                log.warning("sequence %d failed on its own too: %s: %s", item[0].id, type(e).__name__, e)
                failed.append(self._fail(item[0], e))
        return groups, failed

    def _post_process(self, plan, batch, hidden, chosen) -> list[StepOutput]:
        """Advance each sequence by its chosen tokens (EOS, max tokens, stop strings, context), then draft."""
        outputs, drafting = [], []
        for i, ((s, c), (tokens, accepted)) in enumerate(zip(plan, chosen)):
            start = s.num_cached
            if accepted is not None:
                self.stats.spec.record(len(s.drafts), accepted)
                s.num_cached += accepted + 1                 # roll back: positions after the accepted drafts are void
            else:
                s.num_cached += len(c.token_ids)
            s.drafts, s.draft_probs = [], []
            out = self._append_all(s, tokens)
            if out is not None:
                outputs.append(out)
            if self.drafter and not s.finished:
                drafting.append((s, start, s.num_cached, hidden[batch.token_rows[i][: s.num_cached - start]]))
        room = [d for d in drafting if d[2] + self.drafter.k < self.max_context] if drafting else []
        for failed_seq, e in self._draft(room):          # schedule() reserved the blocks drafting writes
            outputs = [o for o in outputs if o.seq is not failed_seq] + [self._fail(failed_seq, e)]
        for s, _ in plan:
            if not s.finished:
                self._register_blocks(s)
        return outputs

    def _draft(self, work: list[tuple]) -> list[tuple[Sequence, Exception]]:
        """Propose the next drafts; returns the sequences whose drafting failed (isolated like a step)."""
        if not work:
            return []
        try:
            self.drafter.draft(work, self.device)
            groups = [work]
        except Exception:  # noqa: BLE001
            if not self.isolate_failures:
                raise
            log.exception("MTP drafting over %d sequences failed; retrying each on its own", len(work))
            groups, failures = [], []
            for w in work:
                w[0].drafts, w[0].draft_probs = [], []
                try:
                    self.drafter.draft([w], self.device)
                    groups.append([w])
                except Exception as e:  # noqa: BLE001
                    failures.append((w[0], e))
            for g in groups:
                for s, _, e, _ in g:
                    s.mtp_valid = e
            return failures
        for s, _, e, _ in work:
            s.mtp_valid = e
        return []

    def _fail(self, s: Sequence, error: Exception) -> StepOutput:
        """End one sequence with an error the caller can report; its blocks are freed."""
        s.finish_reason = "error"
        s.drafts, s.draft_probs = [], []
        self.release(s)
        return StepOutput(s, "", True, [], error=f"{type(error).__name__}: {error}")

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
        """Update s.text; return the newly visible part. Stops at (and drops) the first stop string.
        Each step looks for stop strings only in the text that could hold a new match, and holds back
        the longest tail that could start one: linear in the stop strings' length, not quadratic."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(s.output_ids)
        if s.params.stop:
            hits = [i for stop in s.params.stop
                    if (i := text.find(stop, max(0, s.stop_scanned - len(stop)))) >= 0]
            if hits:
                text, s.finish_reason = text[: min(hits)], "stop"
        if not s.finished:
            if text.endswith("\ufffd"):          # an incomplete UTF-8 sequence: wait for its next byte
                text = text.rstrip("\ufffd")
            # text before the last few characters no longer changes as tokens arrive (a token decodes
            # to at most one replacement character per byte); rescan a margin behind it next step
            s.stop_scanned = max(0, len(text) - 8)
            text = text[: len(text) - max((_stop_prefix_at_end(text, stop) for stop in s.params.stop), default=0)]
        s.text = text if s.finished or len(text) > len(s.text) else s.text
        delta, s.emitted = s.text[s.emitted:], max(s.emitted, len(s.text))
        return delta

    def run_to_completion(self, on_output=None) -> None:
        while self.has_work():
            for out in self.step():
                if on_output is not None:
                    on_output(out)

    def warm_up(self, max_batch: int = 128) -> int:
        """Run throwaway requests through the shapes serving meets, so that kernel compilation and
        CUDA-graph capture happen now instead of inside some client's time to first token (on an
        H100 a Triton compile or a capture met mid-run stalled one step by 1.4-2.9 s): a few decode
        steps of 1, 2, 4, ... max_batch sequences, and a lone prefill of n and of n + 1 tokens for every
        power of two n from 16 to max_batch_tokens (shape-specialising compilers key on size ranges
        and on divisibility). The requests are fixed, so every rank of a parallel engine runs the same
        steps in lockstep. Leaves no sequence, cache block, prefix-cache entry or statistic behind.
        Returns the number of engine steps run."""
        if self.has_work():
            raise RuntimeError("warm_up needs an idle engine")
        saved = self.prefix_caching, self.max_waiting
        self.prefix_caching, self.max_waiting = False, None
        vocab = self.model.cfg.vocab_size

        def prompt(n: int, salt: int) -> list[int]:
            return [2 + (salt * 7919 + i * 104729) % (vocab - 2) for i in range(n)]

        longest = min(self.max_batch_tokens, self.max_context - 2,
                      self.capacity_tokens - self.cache.block_size - 2 - self.reserve)
        before, k = self.stats.steps, 1
        try:
            # prefill k x 2 tokens, then several decode steps of k sequences: with speculation, the
            # verify and draft shapes of both accepted and rejected drafts are met only after a few rounds
            new_tokens = 2 + 3 * self.tokens_per_decode
            room = self.cache.num_blocks // self.cache.blocks_needed(2 + new_tokens + self.reserve)
            while k <= min(max_batch, room):
                for i in range(k):
                    self.add(prompt(2, i), SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
                self.run_to_completion()
                k *= 2
            n = 16
            while n <= longest:
                for length in (n, n + 1):
                    if length <= longest:
                        self.add(prompt(length, length), SamplingParams(max_new_tokens=1, ignore_eos=True))
                        self.run_to_completion()
                n *= 2
            return self.stats.steps - before
        finally:
            self.prefix_caching, self.max_waiting = saved
            self.stats = EngineStats()
