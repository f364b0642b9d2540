"""The scheduler: which sequences run in the next step, and which cache blocks they hold.

Admission control: add() queues a sequence (up to `max_waiting`, then QueueFullError); a waiting
sequence joins the running batch when the cache has blocks for its whole prompt. Each step plans the
running sequences first (decodes, then prompt chunks, up to the token budget: chunked prefill), then
admits waiting ones with what is left. When a running sequence needs a block and none is free, the
most recently admitted sequence is preempted: its blocks are freed and it waits at the head of the
queue to be recomputed (its computed blocks stay in the prefix cache, so recomputation usually
reuses them).

Prefix caching: full blocks of computed tokens are registered in the allocator under a key that
chains their token prefix; a new sequence whose prompt starts with registered blocks shares them
read-only and starts with num_cached = the shared length. With MTP speculation, the MTP layer's
slot i depends on token i + 1 as well, so a block's key then also covers the token after it.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from dsv3.core.batch import Chunk
from dsv3.core.cache import LatentCache, block_key
from dsv3.core.errors import RequestError
from dsv3.core.sampling import SamplingParams

_ids = itertools.count()


@dataclass(eq=False)       # a sequence is itself: `in` / remove() on the queues compare identities, not fields
class Sequence:
    token_ids: list[int]
    prompt_len: int
    params: SamplingParams
    seed: int = 0                      # the counter-based sampler's key (SamplingBatch)
    id: int = field(default_factory=lambda: next(_ids))
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    finish_reason: str | None = None   # "stop" (EOS or stop string), "length", "error" (see StepOutput)
    text: str = ""                     # detokenised output, cut at a stop string
    emitted: int = 0                   # characters of `text` already streamed
    stop_scanned: int = 0              # characters of the text already searched for stop strings
    decoded: str = ""                  # the output's text as far as it is complete UTF-8 (before stop strings)
    decoded_from: int = 0              # output tokens: where the last decode window started ...
    decoded_to: int = 0                # ... and the tokens already in `decoded`
    drafts: list[int] = field(default_factory=list)   # MTP proposals for the positions after the last token
    draft_probs: object = None         # their draft distributions [k, V] on the device (sampling only)
    mtp_valid: int = 0                 # positions whose MTP-layer cache slot holds a verified result
    prefix_keys: list[bytes] = field(default_factory=list)   # prefix-cache keys of the leading full blocks
    num_prefix_cached: int = 0         # prompt tokens taken from the prefix cache at admission
    grammar: object = None             # its SequenceGrammar under structured output (dsv3.core.grammar)
    logprobs: list = field(default_factory=list)          # per output token (params.logprobs): LogprobEntry
    prompt_logprobs: list = field(default_factory=list)   # per prompt token after the first (params.prompt_logprobs)
    leader: "Sequence | None" = None   # n > 1: the choice whose prompt this one shares, until it forks
    followers: list = field(default_factory=list)         # n > 1: the choices waiting on this one's prompt
    forked: bool = False               # took its prompt's cache from a leader (takes no MTP drafts)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output(self) -> int:
        """len(output_ids) without copying them (the step's bookkeeping asks for it per sequence)."""
        return len(self.token_ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class QueueFullError(RequestError):
    """The waiting queue is at its bound; the request was not queued (a server answers 503)."""


class Scheduler:
    def __init__(self, cache: LatentCache, max_batch_tokens: int, reserve: int = 0, key_span: int = 0,
                 prefix_caching: bool = True, max_waiting: int | None = None):
        self.cache = cache
        self.max_batch_tokens = max_batch_tokens
        # Positions a step may write past its chunk: the next verify's k + 1 tokens and the drafter's
        # k - 1 chained MTP slots. Reserved when the chunk is scheduled, so drafting never allocates.
        self.reserve = reserve
        self.tokens_per_decode = max(reserve, 1)
        self.key_span = key_span        # tokens after a block its cached content depends on (MTP: 1)
        self.prefix_caching = prefix_caching
        self.max_waiting = max_waiting  # None: unbounded (offline use queues everything at once)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in admission order: the last one is preempted first
        self.preemptions = 0
        self.prefix_cached_tokens = 0       # prompt tokens served from shared blocks instead of computed

    def add(self, seq: Sequence) -> None:
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting for the cache "
                                 f"(max_waiting = {self.max_waiting}); retry later")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def release(self, seq: Sequence) -> None:
        """Drop a sequence (finished, or abandoned by its caller) and free its blocks now. Choices still
        waiting on it (n > 1) are queued on their own; one waiting on a leader just leaves it."""
        if seq.leader is not None:
            seq.leader.followers.remove(seq)
            seq.leader = None
            return
        self.detach_followers(seq)
        self.register_blocks(seq)
        self.cache.allocator.free(seq.blocks)
        seq.blocks = []
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # -- n > 1: choices that share one prompt ---------------------------------------------------------
    def detach_followers(self, leader: Sequence) -> None:
        """The leader leaves before its prompt step: its followers queue first, each on its own."""
        for f in reversed(leader.followers):
            f.leader = None
            self.waiting.appendleft(f)
        leader.followers = []

    def fork(self, leader: Sequence, f: Sequence) -> bool:
        """Give follower f the leader's computed prompt: its full blocks shared (refcounts), the partial
        last block copied; f joins the running batch with the prompt cached. False (f untouched) when
        the cache has no blocks for it now."""
        bs, n = self.cache.block_size, leader.num_cached
        full = n // bs
        need = self.cache.blocks_needed(len(f.token_ids) + 1 + self.reserve) - full
        if need > self.cache.allocator.num_free:
            return False
        for b in leader.blocks[:full]:
            self.cache.allocator.share(b)
        f.blocks = leader.blocks[:full] + self.cache.allocator.allocate(need)
        if n % bs:
            self.cache.copy_block(leader.blocks[full], f.blocks[full])
        f.num_cached, f.mtp_valid, f.forked = n, 0, True
        f.prefix_keys = leader.prefix_keys[:full]
        self.running.append(f)
        return True

    # -- prefix cache -------------------------------------------------------------------------------
    def register_blocks(self, s: Sequence) -> None:
        """Register every newly complete block: all its slots (the MTP layer's too) hold results."""
        if not self.prefix_caching:
            return
        bs, span = self.cache.block_size, self.key_span
        valid = min(s.num_cached, s.mtp_valid) if span else s.num_cached
        b = len(s.prefix_keys)
        while (b + 1) * bs <= valid and (b + 1) * bs + span <= len(s.token_ids) and b < len(s.blocks):
            key = block_key(s.prefix_keys[-1] if s.prefix_keys else b"", s.token_ids[b * bs: (b + 1) * bs + span])
            self.cache.allocator.register(s.blocks[b], key)
            s.prefix_keys.append(key)
            b += 1

    def _match_prefix(self, s: Sequence) -> tuple[list[int], list[bytes]]:
        """Registered blocks that hold the start of s; the last token is always left to compute,
        since its logits are needed and a shared block is never written."""
        if not self.prefix_caching or s.params.prompt_logprobs is not None:    # every prompt row is needed
            return [], []
        bs, span = self.cache.block_size, self.key_span
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
    def _admit(self, budget: int, outgrown: list[Sequence]) -> list[Sequence]:
        """Move waiting sequences (first come, first served) into the running batch while the cache
        holds their whole prompt (allocated now) and the token budget one decode step for each."""
        alloc, admitted = self.cache.allocator, []
        while (self.waiting and budget > 0
               and (len(self.running) + 1) * self.tokens_per_decode <= self.max_batch_tokens):
            s = self.waiting[0]
            need = self.cache.blocks_needed(len(s.token_ids) + self.reserve)
            if need > self.cache.num_blocks:      # a preempted sequence that outgrew the whole cache
                self.waiting.popleft()
                outgrown.append(s)
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
            self.prefix_cached_tokens += s.num_cached
            self.running.append(s)
            admitted.append(s)
            budget -= len(s.token_ids) - s.num_cached
        return admitted

    def _preempt(self, s: Sequence) -> None:
        """Free a running sequence's blocks and queue it first for recomputation."""
        self.register_blocks(s)
        self.cache.allocator.free(s.blocks)
        s.blocks, s.prefix_keys, s.num_cached, s.mtp_valid = [], [], 0, 0
        s.drafts, s.draft_probs = [], None
        self.running.remove(s)
        self.waiting.appendleft(s)
        self.preemptions += 1

    def schedule(self) -> tuple[list[tuple[Sequence, Chunk]], list[Sequence]]:
        """(the step's plan, sequences that outgrew the whole cache). Running sequences come first
        (decodes, then prompt chunks), growing their blocks and preempting the most recently admitted
        when the cache runs out; then, unless that happened, waiting sequences join with what is left
        of the cache and the token budget. Outgrown sequences are still in the queues: the caller
        ends them ("length") and releases them."""
        plan, outgrown, budget, preempted = [], [], self.max_batch_tokens, False
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
                    outgrown.append(s)
                continue
            self.cache.grow(s.blocks, need)
            plan.append((s, Chunk(tokens[:n], s.num_cached, list(s.blocks),
                                  decode=s.num_cached > 0 and s in decoding)))
            budget -= n
            i += 1
        # Admitting right after a preemption would hand the freed blocks to a newcomer and preempt
        # again next step (thrashing); the preempted sequence is first in the queue instead.
        for s in [] if preempted else self._admit(budget, outgrown):
            n = min(len(s.token_ids) - s.num_cached, budget)
            if n <= 0:
                break
            plan.append((s, Chunk(s.token_ids[s.num_cached: s.num_cached + n], s.num_cached, list(s.blocks))))
            budget -= n
        return plan, outgrown
