"""Structured output: grammars compiled by xgrammar, matched per sequence, applied as token bitmasks.

A request's constraint travels as a GrammarSpec (plain strings, so it crosses to the engine process
inside SamplingParams). The engine parses it when the request arrives and compiles it against the
model's tokenizer on a thread of its own (one xgrammar compiler per tokenizer, compiled grammars kept
per spec), while the prompt is prefilled; the sequence holds a SequenceGrammar. Each step
the runner asks apply_bitmask() to mask the logits rows of the sequences being constrained: their
bitmasks are filled on the host, copied to the logits' device once, and applied to the whole batch
there. A step with no constrained row allocates nothing.

Reasoning models think before they answer: a spec with `after_token` (the `</think>` token) leaves the
output free until that token has been generated and constrains only what follows.

JSON may hold at most one whitespace character between its tokens (`{"a": 1}` or `{"a":1}`, not
pretty-printed): with free whitespace a weak model can stall in it until max_tokens.
"""
from __future__ import annotations

import functools
import json
import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from dsv3.core.errors import RequestError

MAX_WHITESPACE = 1                # consecutive whitespace characters allowed between JSON tokens
_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match. Build it with json_object(), json_schema() or tool_calls()."""
    kind: str                      # "json_schema" | "structural_tag"
    definition: str                # the JSON schema, or xgrammar's structural tag, as JSON text
    after_token: int | None = None     # free until this token id is generated (`</think>`), constrained after

    def after(self, token_id: int | None) -> "GrammarSpec":
        """The same constraint, starting after `token_id` (None: from the first token)."""
        return GrammarSpec(self.kind, self.definition, token_id)


def json_object() -> GrammarSpec:
    """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
    return GrammarSpec("json_schema", '{"type": "object"}')


def json_schema(schema) -> GrammarSpec:
    """A JSON value valid under `schema` (a dict, or its JSON text). Raises RequestError naming the
    problem when the schema is not one xgrammar can enforce."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise RequestError(f"the JSON schema is not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise RequestError(f"the JSON schema must be a JSON object, got {type(schema).__name__}")
    spec = GrammarSpec("json_schema", json.dumps(schema, ensure_ascii=False))
    check(spec)
    return spec


def response_format(value) -> GrammarSpec | None:
    """The grammar of an OpenAI `response_format`: {"type": "text"} (None), {"type": "json_object"},
    or {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind == "json_schema":
        schema = value.get("json_schema")
        if not isinstance(schema, dict) or "schema" not in schema:
            raise RequestError("response_format of type json_schema needs json_schema.schema (the JSON schema "
                               "the answer must follow)")
        return json_schema(schema["schema"])
    raise RequestError(f"response_format must be {{\"type\": \"text\" | \"json_object\" | \"json_schema\"}}, "
                       f"got {value!r:.80}")


@dataclass(frozen=True)
class ToolCallShape:
    """How one tool call is written: `begin` + arguments (JSON under `parameters`) + `end`."""
    begin: str                     # e.g. "<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>"
    parameters: dict               # the function's JSON schema
    end: str                       # e.g. "<｜tool▁call▁end｜>"


def tool_calls(calls: list[ToolCallShape], begin: str, separator: str, end: str, parallel: bool) -> GrammarSpec:
    """`begin`, one call of `calls` (or, when `parallel`, one or more joined by `separator`), `end`: the
    output of a forced or required tool choice, whose arguments always validate against their schema."""
    if not calls:
        raise RequestError("a required tool choice needs at least one tool")
    tags = [{"type": "tag", "begin": c.begin, "end": c.end,
             "content": {"type": "json_schema", "json_schema": c.parameters, "max_whitespace_cnt": MAX_WHITESPACE}} for c in calls]
    tag = {"type": "structural_tag", "format": {
        "type": "tag", "begin": begin, "end": end,
        "content": {"type": "tags_with_separator", "tags": tags, "separator": separator,
                    "at_least_one": True, "stop_after_first": not parallel}}}
    spec = GrammarSpec("structural_tag", json.dumps(tag, ensure_ascii=False))
    check(spec)
    return spec


def check(spec: GrammarSpec) -> None:
    """Parse the spec's grammar (no tokenizer needed, milliseconds): RequestError if xgrammar refuses it."""
    _grammar(spec)


# Two fixes to the JSON-string character classes of xgrammar 0.2.9's grammars, made in their EBNF text:
# a length-bounded string (maxLength) admits the raw control characters U+0000-U+001F that JSON forbids
# in strings, and every string admits the UTF-8 encodings of surrogates (U+D800-U+DFFF), which are not
# UTF-8 (they decode to replacement characters, so a 10-character string can come back longer).
_STRING_CHARS = {
    r'[^\"\\\r\n]': r'[^\0-\x1f\"\\\uD800-\uDFFF]',                   # bounded strings
    r'[^\0-\x1f\"\\\r\n]': r'[^\0-\x1f\"\\\r\n\uD800-\uDFFF]',       # unbounded strings
}


def _json_strings_fixed(ebnf: str) -> str:
    for broken, fixed in _STRING_CHARS.items():
        ebnf = ebnf.replace(broken, fixed)
    return ebnf


def _grammar(spec: GrammarSpec):
    """The spec as an xgrammar Grammar; RequestError naming the problem if xgrammar refuses it."""
    import xgrammar as xgr
    try:
        if spec.kind == "json_schema":
            grammar = xgr.Grammar.from_json_schema(spec.definition, max_whitespace_cnt=MAX_WHITESPACE)
        elif spec.kind == "structural_tag":
            grammar = xgr.Grammar.from_structural_tag(spec.definition)
        else:
            raise RequestError(f"unknown grammar kind {spec.kind!r}; use json_schema or structural_tag")
    except (RuntimeError, ValueError) as e:
        raise RequestError(f"the JSON schema cannot be enforced: {_xgrammar_message(e)}") from None
    return xgr.Grammar.from_ebnf(_json_strings_fixed(str(grammar)))


def _xgrammar_message(e: Exception) -> str:
    """xgrammar's error without its C++ source location: `Unsupported type "foo"`."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return _XGRAMMAR_LOCATION.sub("", text)


class SequenceGrammar:
    """One sequence's grammar state: xgrammar's matcher, idle until `after_token` has been generated.
    The grammar may still be compiling: the matcher is made on first use, waiting for the compile."""

    def __init__(self, compiled: Future, after_token: int | None):
        self._compiled, self._matcher = compiled, None
        self.waiting_for = after_token

    @property
    def matcher(self):
        if self._matcher is None:
            import xgrammar as xgr
            self._matcher = xgr.GrammarMatcher(self._compiled.result())
        return self._matcher

    @property
    def constraining(self) -> bool:
        """Does the next token's choice go through the grammar?"""
        return self.waiting_for is None and not self.matcher.is_terminated()

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token (EOS) was accepted."""
        return self.waiting_for is None and self.matcher.is_terminated()

    def accept(self, token: int) -> bool:
        """Advance by a generated token; False when the grammar does not allow it."""
        if self.waiting_for is not None:
            if token == self.waiting_for:
                self.waiting_for = None
            return True
        return self.matcher.accept_token(token)

    def fill_row(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


MAX_COMPILED_GRAMMARS = 64        # per compiler, least recently used dropped first (each holds token-mask caches)


class GrammarCompiler:
    """xgrammar's compiler for one tokenizer and vocabulary. A spec is parsed when a sequence asks for
    it (a RequestError then if xgrammar refuses it) and compiled against the vocabulary on a thread of
    the compiler's own (xgrammar releases the GIL), so a new schema does not stall the engine's steps:
    tens of ms for a small schema at 129k tokens, more for large ones. Compiled grammars are kept per
    spec (MAX_COMPILED_GRAMMARS)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
        # vocab_size is the model's (the logits' width): ids past the tokenizer's are never allowed
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)   # cached here, bounded
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsv3-grammar")
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()

    def matcher(self, spec: GrammarSpec) -> SequenceGrammar:
        key = (spec.kind, spec.definition)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._pool.submit(self._compile, _grammar(spec))
            self._compiled[key] = compiled
            while len(self._compiled) > MAX_COMPILED_GRAMMARS:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return SequenceGrammar(compiled, spec.after_token)

    def _compile(self, parsed):
        try:
            return self._compiler.compile_grammar(parsed)
        except RuntimeError as e:
            raise RequestError(f"the grammar cannot be compiled: {_xgrammar_message(e)}") from None


@functools.lru_cache(maxsize=8)
def compiler_for(tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]) -> GrammarCompiler:
    """The compiler of a tokenizer (built on first use: it reads the whole vocabulary)."""
    return GrammarCompiler(tokenizer, vocab_size, list(stop_token_ids))


def apply_bitmask(logits: torch.Tensor, grammars: list[SequenceGrammar | None]) -> None:
    """Mask, in place, the rows of logits [R, V] whose sequence is being constrained: disallowed
    tokens get -inf. Row i belongs to grammars[i]; rows without one (or not yet constraining) are
    left alone, and when no row is constrained nothing is allocated or copied."""
    rows = [i for i, g in enumerate(grammars) if g is not None and g.constraining]
    if not rows:
        return
    import xgrammar as xgr
    bitmask = xgr.allocate_token_bitmask(len(grammars), logits.shape[-1])   # [R, ceil(V/32)] int32, all allowed
    for i in rows:
        grammars[i].fill_row(bitmask, i)
    bitmask = bitmask.to(logits.device)                                     # the step's one host->device copy
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
