"""Sampling parameters and the token sampler (temperature, top-k, top-p, per-request seed)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv3.core.errors import RequestError
from dsv3.core.grammar import GrammarSpec


SEED_RANGE = (-(2**63), 2**64 - 1)      # what torch.Generator.manual_seed accepts
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024                     # per stop string: the hold-back check is linear in it


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                # 0 = no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    grammar: GrammarSpec | None = None     # structured output: what the output must match (dsv3.core.grammar)

    def __post_init__(self):
        lo, hi = SEED_RANGE
        checks = ((self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
                  (math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
                   "must be a finite number >= 0 (0 means greedy)"),
                  (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
                  (self.top_k >= 0, "top_k", "must be >= 0 (0 means no limit)"),
                  (self.seed is None or lo <= self.seed <= hi, "seed", f"must be an integer in [{lo}, {hi}]"),
                  (len(self.stop) <= MAX_STOP_STRINGS and all(self.stop), "stop",
                   f"give at most {MAX_STOP_STRINGS} non-empty strings"),
                  (all(len(s) <= MAX_STOP_CHARS for s in self.stop), "stop",
                   f"each stop string may hold at most {MAX_STOP_CHARS} characters"))
        for ok, key, msg in checks:
            if not ok:
                value = getattr(self, key)
                shown = repr(value) if len(repr(value)) <= 80 else f"{repr(value)[:60]}... ({len(repr(value))} chars)"
                raise RequestError(f"{key} = {shown}: {msg}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SamplingBatch:
    """The sampling parameters of R rows (one request each) as device tensors, built once per step.

    Random draws are counter-based: a row's uniforms are a hash of (its request's seed, the position
    of the token being chosen, a stream id, the vocabulary index), so a seeded request samples the
    same tokens whatever else shares its batch, and no per-row generator or host round trip is needed.
    """

    def __init__(self, params: list[SamplingParams], seeds: list[int], positions: list[int], device):
        self.rows = len(params)
        self.greedy_only = all(p.greedy for p in params)
        self.device = device
        if self.greedy_only:
            return
        self.greedy = torch.tensor([p.greedy for p in params], device=device)
        self.temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params],
                                        dtype=torch.float32, device=device)
        self.top_k = [p.top_k for p in params]
        self.top_p = [p.top_p for p in params]
        self.filtered = any(self.top_k) or any(t < 1.0 for t in self.top_p)
        self.seed = torch.tensor([s % 2**64 - 2**63 for s in seeds], dtype=torch.int64, device=device)
        self.position = torch.tensor(positions, dtype=torch.int64, device=device)

    def repeat(self, n: int, offsets: bool = True) -> "SamplingBatch":
        """Each row n times (a verify chunk's k + 1 positions), positions counting up when `offsets`."""
        out = SamplingBatch.__new__(SamplingBatch)
        out.rows, out.greedy_only, out.device = self.rows * n, self.greedy_only, self.device
        if self.greedy_only:
            return out
        out.greedy, out.temperature = self.greedy.repeat_interleave(n), self.temperature.repeat_interleave(n)
        out.top_k = [k for k in self.top_k for _ in range(n)]
        out.top_p = [p for p in self.top_p for _ in range(n)]
        out.filtered, out.seed = self.filtered, self.seed.repeat_interleave(n)
        step = torch.arange(n, device=self.device).repeat(self.rows) if offsets else 0
        out.position = self.position.repeat_interleave(n) + step
        return out

    def shifted(self, n: int) -> "SamplingBatch":
        """The same rows, n positions later (the next draft of a chain)."""
        out = self.repeat(1, offsets=False)
        if not self.greedy_only:
            out.position = self.position + n
        return out

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [R, V] -> the distributions the rows sample from [R, V] float32: temperature, then
        top-k, then top-p (the smallest prefix of the sorted distribution reaching top_p)."""
        assert logits.shape[0] == self.rows or self.greedy_only, (
            f"{logits.shape[0]} logit rows for a batch of {self.rows}: repeat() the batch per position")
        logits = logits.float() / self.temperature[:, None]
        if self.filtered:
            vocab = logits.shape[-1]
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            k = torch.tensor([min(k, vocab) if k else vocab for k in self.top_k], device=logits.device)
            kth = sorted_logits.gather(1, (k - 1)[:, None])
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
            sorted_p = sorted_logits.softmax(-1)
            top_p = torch.tensor(self.top_p, dtype=torch.float32, device=logits.device)
            drop = (sorted_p.cumsum(-1) - sorted_p > top_p[:, None]) & (top_p[:, None] < 1.0)
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(sorted_p).scatter_(-1, order, sorted_p)
            return probs / probs.sum(-1, keepdim=True)
        return logits.softmax(-1)

    def uniform(self, stream: int, width: int) -> torch.Tensor:
        """[R, width] uniforms in (0, 1) for this step's positions: stream 0 samples, 1 accepts drafts,
        2 samples a rejected draft's replacement, 3 samples drafts."""
        key = _mix(_mix(self.seed & _M32) ^ _mix((self.seed >> 32) & _M32))
        key = _mix(key ^ ((self.position * 4 + stream) & _M32))                  # [R]
        index = torch.arange(width, device=self.device, dtype=torch.int64)
        h = _mix((key[:, None] + index[None, :] * 0x9E3779B9) & _M32)            # [R, width]
        return ((h >> 8).float() + 0.5) / 2**24

    def choose(self, probs: torch.Tensor, stream: int) -> torch.Tensor:
        """One token per row drawn from probs [R, V] (the exponential race: argmax p / E, E ~ Exp(1))."""
        return (probs / -self.uniform(stream, probs.shape[-1]).log()).argmax(-1)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [R, V] -> tokens [R] int64 on the device (argmax for greedy rows)."""
        best = logits.argmax(-1)
        if self.greedy_only:
            return best
        return torch.where(self.greedy, best, self.choose(self.probs(logits), stream=0))


_M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32; every
    multiplier is < 2**31, so no product leaves int64."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x5BD1E995) & _M32
    x = ((x ^ (x >> 16)) * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)
