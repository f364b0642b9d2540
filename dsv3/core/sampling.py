"""Sampling parameters and the token sampler (temperature, top-k, top-p, per-request seed), the
per-row logit edits that come before it (penalties, logit_bias, min_tokens: LogitsProcessing), and
the checkpoint's default sampling values (generation_config.json)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv3.core.errors import RequestError
from dsv3.core.grammar import GrammarSpec


SEED_RANGE = (-(2**63), 2**64 - 1)      # what torch.Generator.manual_seed accepts
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024                     # per stop string: the hold-back check is linear in it
MAX_LOGPROBS = 20                         # alternatives per token (OpenAI's top_logprobs bound)
MAX_LOGIT_BIAS = 300                      # entries in logit_bias (OpenAI's bound)
MAX_STOP_TOKEN_IDS = 64


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
    presence_penalty: float = 0.0           # OpenAI: minus this from every token already generated
    frequency_penalty: float = 0.0          # OpenAI: minus this times how often a token was generated
    repetition_penalty: float = 1.0         # HF/vLLM: tokens in prompt or output, logit / this (> 0) or * this
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias in [-100, 100]) added to the logits
    min_tokens: int = 0                     # EOS and stop_token_ids are masked until this many are generated
    stop_token_ids: tuple[int, ...] = ()    # end the output at any of these (like EOS: not part of it)
    logprobs: int | None = None             # per generated token: its logprob and this many alternatives
    prompt_logprobs: int | None = None      # per prompt token (after the first): the same, of the model

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
                   f"each stop string may hold at most {MAX_STOP_CHARS} characters"),
                  (math.isfinite(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
                   "must be in [-2, 2]"),
                  (math.isfinite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                   "frequency_penalty", "must be in [-2, 2]"),
                  (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10,
                   "repetition_penalty", "must be in (0, 10] (1 means none)"),
                  (len(self.logit_bias) <= MAX_LOGIT_BIAS and all(
                      t >= 0 and math.isfinite(b) and -100 <= b <= 100 for t, b in self.logit_bias), "logit_bias",
                   f"maps at most {MAX_LOGIT_BIAS} token ids (>= 0) to biases in [-100, 100]"),
                  (0 <= self.min_tokens <= self.max_new_tokens, "min_tokens", "must be in [0, max_new_tokens]"),
                  # a complete grammar allows only EOS, which min_tokens would mask: no token would be left
                  (self.grammar is None or self.min_tokens == 0, "min_tokens",
                   "cannot be combined with structured output (response_format, a required or named tool_choice): "
                   "the grammar decides where the answer ends"),
                  (len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS and all(t >= 0 for t in self.stop_token_ids),
                   "stop_token_ids", f"give at most {MAX_STOP_TOKEN_IDS} token ids (>= 0)"),
                  (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
                   f"must be in [0, {MAX_LOGPROBS}]"),
                  (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
                   f"must be in [0, {MAX_LOGPROBS}]"))
        for ok, key, msg in checks:
            if not ok:
                value = getattr(self, key)
                shown = repr(value) if len(repr(value)) <= 80 else f"{repr(value)[:60]}... ({len(repr(value))} chars)"
                raise RequestError(f"{key} = {shown}: {msg}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def edits_logits(self) -> bool:
        """Does LogitsProcessing touch this row (at some step)?"""
        return self.penalized or bool(self.logit_bias) or self.min_tokens > 0


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of an n > 1 request seeded `seed`: choice 0 keeps it (so n = 1 and
    the first of n agree), the others get a hash of (seed, index)."""
    if seed is None or index == 0:
        return seed
    x = (seed + index * 0x9E3779B97F4A7C15) % 2**64                   # splitmix64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)


GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def generation_defaults(model_dir: str | Path) -> dict:
    """The sampling values a checkpoint recommends (its generation_config.json: temperature, top_p,
    top_k, repetition_penalty), used where a request leaves them unset, as vLLM does; {} without one.
    A value of the wrong type is ignored; a value out of range fails when a request uses it."""
    path = Path(model_dir) / "generation_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    out = {}
    for key in GENERATION_DEFAULT_KEYS:
        v = cfg.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = int(v) if key == "top_k" else float(v)
    if out.get("top_k", 0) < 0:          # HF / vLLM spell "no limit" -1
        out["top_k"] = 0
    return out


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
        return unit_interval(h)

    def choose(self, probs: torch.Tensor, stream: int) -> torch.Tensor:
        """One token per row drawn from probs [R, V] (the exponential race: argmax p / E, E ~ Exp(1))."""
        return (probs / -self.uniform(stream, probs.shape[-1]).log()).argmax(-1)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [R, V] -> tokens [R] int64 on the device (argmax for greedy rows)."""
        best = logits.argmax(-1)
        if self.greedy_only:
            return best
        return torch.where(self.greedy, best, self.choose(self.probs(logits), stream=0))

    def sample_with_log_probs(self, logits: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sample(logits), and for the rows `rows` [W] the log-probabilities [W, V] float32 of the
        distribution each samples from (vLLM's "processed" logprobs), from the same filtering: after
        temperature, top-k and top-p (-inf where filtered out); a greedy row's are the log-softmax of
        its logits (temperature 1, no filter)."""
        best = logits.argmax(-1)
        plain = logits[rows].float().log_softmax(-1)
        if self.greedy_only:
            return best, plain
        probs = self.probs(logits)
        tokens = torch.where(self.greedy, best, self.choose(probs, stream=0))
        sampled = (probs[rows].log() if self.filtered
                   else (logits[rows].float() / self.temperature[rows, None]).log_softmax(-1))
        return tokens, torch.where(self.greedy[rows, None], plain, sampled)


class LogitsProcessing:
    """What some rows of a step change in their logits before sampling, applied to the whole batch
    on the device in a few vectorised ops: repetition penalty (prompt + output tokens, HF/vLLM), then
    frequency and presence penalties (output tokens, OpenAI), logit_bias, and min_tokens (EOS and
    stop_token_ids at -inf). build() returns None when no row asks for any of it, so such a step
    pays nothing. Token counts are scattered on the device from the rows' token ids each step (a
    host->device copy, no device->host read), so they follow preemption and rollback for free."""

    def __init__(self, device):
        self.device = device
        self.penalty = None        # (rows [Rp], token rows, token ids, prompt rows, prompt ids, rep, freq, pres)
        self.repetition = False    # does any penalised row have a repetition penalty
        self.bias = None           # (rows, ids, values): flat (row, token) pairs
        self.banned = None         # (rows, ids): flat (row, token) pairs set to -inf

    @classmethod
    def build(cls, seqs: list, eos_ids, device) -> "LogitsProcessing | None":
        """seqs: the batch's rows in order (anything with .params, .token_ids, .prompt_len)."""
        if not any(s.params.edits_logits for s in seqs):
            return None
        out = cls(device)
        pen = [(i, s) for i, s in enumerate(seqs) if s.params.penalized]
        if pen:
            rows, out_r, out_t, pr_r, pr_t = [], [], [], [], []
            for j, (i, s) in enumerate(pen):
                rows.append(i)
                generated = s.token_ids[s.prompt_len:]
                out_r += [j] * len(generated)
                out_t += generated
                if s.params.repetition_penalty != 1.0:
                    pr_r += [j] * s.prompt_len
                    pr_t += s.token_ids[: s.prompt_len]
            t = out._tensor
            out.repetition = any(s.params.repetition_penalty != 1.0 for _, s in pen)     # decided on the host
            out.penalty = (t(rows), t(out_r), t(out_t), t(pr_r), t(pr_t),
                           t([s.params.repetition_penalty for _, s in pen], torch.float32)[:, None],
                           t([s.params.frequency_penalty for _, s in pen], torch.float32)[:, None],
                           t([s.params.presence_penalty for _, s in pen], torch.float32)[:, None])
        bias = [(i, tok, b) for i, s in enumerate(seqs) for tok, b in s.params.logit_bias]
        if bias:
            out.bias = (out._tensor([b[0] for b in bias]), out._tensor([b[1] for b in bias]),
                        out._tensor([b[2] for b in bias], torch.float32))
        banned = [(i, tok) for i, s in enumerate(seqs) if len(s.token_ids) - s.prompt_len < s.params.min_tokens
                  for tok in dict.fromkeys([*eos_ids, *s.params.stop_token_ids])]
        if banned:
            out.banned = (out._tensor([b[0] for b in banned]), out._tensor([b[1] for b in banned]))
        return out

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def apply(self, logits: torch.Tensor) -> None:
        """Edit logits [R, V] in place (R: the rows build() was given)."""
        if self.penalty is not None:
            rows, out_r, out_t, pr_r, pr_t, rep, freq, pres = self.penalty
            sub = logits[rows].float()                                                 # [Rp, V]
            counts = torch.zeros_like(sub).index_put_((out_r, out_t), torch.ones_like(out_t, dtype=sub.dtype),
                                                      accumulate=True)                # output token counts
            if self.repetition:
                seen = counts > 0
                seen[pr_r, pr_t] = True
                sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
            sub = sub - freq * counts - pres * (counts > 0).float()
            logits[rows] = sub.to(logits.dtype)
        if self.bias is not None:
            rows, ids, values = self.bias
            logits.index_put_((rows, ids), values.to(logits.dtype), accumulate=True)
        if self.banned is not None:
            logits[self.banned] = float("-inf")


_M32 = 0xFFFFFFFF


def unit_interval(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 uniforms strictly inside (0, 1): the top 23 bits, centred. (24 bits would
    round the largest, 2^24 - 0.5, up to exactly 1.0 in float32: then -log(u) = 0 and the exponential
    race divides by zero, and a token of probability 0 (masked by a grammar, cut by top-p) won as NaN.)"""
    return ((h >> 9).float() + 0.5) / 2**23


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32; every
    multiplier is < 2**31, so no product leaves int64."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x5BD1E995) & _M32
    x = ((x ^ (x >> 16)) * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)
