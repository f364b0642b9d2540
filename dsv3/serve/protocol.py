"""The OpenAI wire format: request schemas (validated strictly), error objects, response bodies.

Requests are parsed with pydantic in strict JSON mode, so `"max_tokens": "5"` or `"stream": 1` is a
400 that names the field rather than a silent coercion. Fields this server does not implement are
rejected when they ask for behaviour (best_of other than n, suffix), and accepted when they
hold their neutral value, so clients that always send defaults keep working; unknown fields are
ignored, as OpenAI-compatible servers commonly do.

Logprobs are those of the distribution each token was sampled from (after penalties, logit_bias,
temperature, top-k and top-p; vLLM's "processed" logprobs; a greedy request's are its log-softmax),
a token filtered out reads -9999.0 as in vLLM; echoed prompt tokens carry the model's own
log-softmax, the first one None as in OpenAI.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_N = 16                  # choices per prompt
MAX_PROMPTS = 64            # prompts per /v1/completions request


class APIError(Exception):
    """An error answered as an OpenAI error object: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None           # extension (vLLM, SGLang): 0 or -1 = no limit
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False           # extension (vLLM): keep generating past EOS, for benchmarks
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None    # extension (vLLM): HF's, over prompt and output tokens
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0                # extension (vLLM): no EOS / stop token id before this many tokens
    stop_token_ids: list[int] | None = None    # extension (vLLM): end at these token ids, like EOS
    user: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, reason) for each field that asks for something this server does not do."""
        out = []
        if not 1 <= self.n <= MAX_N:
            out.append(("n", f"n = {self.n}: must be in [1, {MAX_N}]"))
        for key in (self.logit_bias or {}):
            if not key.isdigit():
                out.append(("logit_bias", f"logit_bias key {key[:40]!r} is not a token id (a decimal integer)"))
                break
        return out

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self):
        out = super().unsupported()
        if self.best_of not in (None, self.n):
            out.append(("best_of", f"best_of = {self.best_of}: this server returns every choice it samples; "
                                   f"leave best_of unset (or equal to n)"))
        if self.suffix:
            out.append(("suffix", "suffix is not supported by this server"))
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            out.append(("logprobs", f"logprobs = {self.logprobs}: must be in [0, 20]"))
        return out

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one (a string or token ids) or a list of them."""
        p = self.prompt
        prompts = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request",
                           param="prompt")
        for i, one in enumerate(prompts):
            if len(one) == 0:
                where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                raise APIError(400, f"{where} is empty: give at least one token", param="prompt")
        return prompts


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str                     # JSON text, as the model wrote it


class MessageToolCall(_Strict):
    """A tool call of an earlier assistant turn, sent back in the history."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[MessageToolCall] | None = None      # assistant turns that called tools
    tool_call_id: str | None = None                       # a tool turn: the call it answers
    name: str | None = None
    reasoning_content: str | None = None                  # accepted and dropped: templates drop earlier reasoning

    @model_validator(mode="after")
    def _content_given(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant message with "
                             f"tool_calls may leave it null)")
        return self

    def as_template_input(self) -> dict:
        text = self.content if isinstance(self.content, str) or self.content is None else "".join(
            p.text for p in self.content)
        out = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")     # OpenAI's rule: letters, digits, _ . -, 64 at most
    description: str | None = None
    parameters: dict | None = None     # a JSON schema for the arguments
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


class JSONSchemaResponse(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaResponse | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict | None = None    # extension (vLLM, SGLang): more template variables, e.g. thinking

    def unsupported(self):
        out = super().unsupported()
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            out.append(("top_logprobs", f"top_logprobs = {self.top_logprobs}: must be in [0, 20]"))
        elif self.top_logprobs and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        return out


def parse(schema: type[_Strict], body: bytes):
    """Validate a request body; every problem becomes a 400 naming the first offending field."""
    try:
        req = schema.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON ({err['msg']})") from None
        if not err["loc"]:
            raise APIError(400, "the request body must be a JSON object") from None
        param = ".".join(str(x) for x in err["loc"] if isinstance(x, (str, int)))
        first = str(err["loc"][0])
        extra = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise APIError(400, f"{param}: {err['msg']}{extra}", param=first) from None
    for name, reason in req.unsupported():
        raise APIError(400, reason, param=name)
    return req


def stop_list(stop) -> tuple[str, ...]:
    """The request's stop strings; SamplingParams bounds their count and length."""
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


# -- response bodies ------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_body(rid: str, model: str, text: str, finish_reason: str, use: dict, index: int = 0,
              logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs, "finish_reason": finish_reason}],
            "usage": use}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               index: int = 0, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def completion_body(rid: str, model: str, text: str, finish_reason: str, use: dict, index: int = 0,
                    logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
            "usage": use}


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None = None,
                     index: int = 0, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


# -- logprobs -------------------------------------------------------------------------------------
FILTERED_LOGPROB = -9999.0      # a token the sampler could not pick (top-k / top-p / a ban), as vLLM writes it


def _finite(lp: float) -> float:
    return lp if lp > FILTERED_LOGPROB else FILTERED_LOGPROB


class TokenTexts:
    """Each token's text and bytes as logprobs show them: the byte-level BPE piece's raw bytes (a
    piece may hold part of a UTF-8 character; its text then shows U+FFFD), special tokens as written."""

    def __init__(self, tok):
        self._tok = tok.backend
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
            range(ord("\xae"), ord("\xff") + 1))
        cs, n = bs[:], 0
        for b in range(256):                       # GPT-2's bytes_to_unicode, inverted
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self._byte_of = {chr(c): b for b, c in zip(bs, cs)}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self._tok.id_to_token(token_id) or ""
            if piece and all(ch in self._byte_of for ch in piece):
                raw = bytes(self._byte_of[ch] for ch in piece)
            else:
                raw = piece.encode()
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return hit


def chat_logprobs(texts: TokenTexts, token_ids: list[int], entries: list) -> dict:
    """OpenAI's chat `logprobs` object for these tokens and their (logprob, top ids, top logprobs)."""
    def item(t: int, lp: float) -> dict:
        text, raw = texts(t)
        return {"token": text, "logprob": _finite(lp), "bytes": list(raw)}
    return {"content": [dict(item(t, lp), top_logprobs=[item(i, v) for i, v in zip(ids, vals)])
                        for t, (lp, ids, vals) in zip(token_ids, entries)], "refusal": None}


def completion_logprobs(texts: TokenTexts, token_ids: list[int], entries: list, offset: int = 0) -> dict:
    """OpenAI's legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs (a
    {token: logprob} per token, None where there is no entry: the first prompt token), text_offset
    (each token's start in the choice's text, from `offset`)."""
    tokens, lps, tops, offsets = [], [], [], []
    for t, entry in zip(token_ids, entries):
        text = texts(t)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            lps.append(None)
            tops.append(None)
        else:
            lp, ids, vals = entry
            lps.append(_finite(lp))
            top: dict[str, float] = {}
            for i, v in zip(ids, vals):
                top.setdefault(texts(i)[0], _finite(v))
            tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}
