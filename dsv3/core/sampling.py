"""Sampling parameters and the token sampler (temperature, top-k, top-p, per-request seed)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv3.core.errors import RequestError


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


def target_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a request samples from: logits [..., V] -> probs [..., V] after temperature,
    top-k and top-p (the same filter is applied to draft and target in speculative decoding)."""
    logits = logits.float() / max(p.temperature, 1e-5)
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > p.top_p      # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits [V]."""
    if params.greedy:
        return int(logits.argmax())
    probs = target_probs(logits, params)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
