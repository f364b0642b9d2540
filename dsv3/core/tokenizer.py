"""Tokenizer from a checkpoint directory: tokenizer.json (HF tokenizers) + tokenizer_config.json
(BOS handling, special tokens, the chat template, rendered with a sandboxed Jinja environment)."""
from __future__ import annotations

import functools
import re
import time
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from dsv3.core.errors import CheckpointError, RequestError, read_document

MAX_TOKENIZER_CONFIG_BYTES = 64 * 2**20   # real ones are ~1 MB at most (added tokens); refuse a wrong file early
RENDER_SECONDS = 5.0
RENDER_CHARS = 16 * 1024 * 1024
_MARK = "\ue000{}\ue001"                      # private-use characters: never in a template's own text
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


def _token_text(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def read_tokenizer_config(path: Path) -> dict:
    """tokenizer_config.json, checked: a JSON object whose bos/eos tokens are strings (or {"content": str})
    and whose chat_template is a string; HF's list of named templates gives its "default" one."""
    cfg = read_document(path, CheckpointError, "a tokenizer config", max_bytes=MAX_TOKENIZER_CONFIG_BYTES,
                        hint="; restore the checkpoint's tokenizer_config.json")
    for key in ("bos_token", "eos_token"):
        if cfg.get(key) is not None and not isinstance(_token_text(cfg[key]), str):
            raise CheckpointError(f"{path}: {key} must be a string or {{\"content\": string}}, "
                                  f"got {type(cfg[key]).__name__}")
    template = cfg.get("chat_template")
    if isinstance(template, list):   # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = cfg["chat_template"] = named.get("default")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{path}: chat_template must be a string (or a list of named templates with a "
                              f"\"default\" one), got {type(template).__name__}")
    return cfg


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: no tokenizer.json; copy the checkpoint's tokenizer files "
                                  f"into the model directory")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
            raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from e
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = read_tokenizer_config(cfg_path) if cfg_path.is_file() else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", self.bos_token is not None))
        self.chat_template = cfg.get("chat_template")
        self.bos_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def backend(self):
        """The Hugging Face `tokenizers.Tokenizer` underneath (xgrammar reads its vocabulary)."""
        return self._tok

    def token_id(self, text: str) -> int | None:
        """The id of the single token spelled `text` (`</think>`), None if no token is."""
        return self._tok.token_to_id(text)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token decodes to: a prompt of more than n * this bytes holds more
        than n tokens, which lets a server refuse it before tokenizing it."""
        ids = [[i] for i in range(self.vocab_size)]
        return max(len(t.encode()) for t in self._tok.decode_batch(ids, skip_special_tokens=False))

    @functools.cached_property
    def special_texts(self) -> tuple[str, ...]:
        """The added tokens flagged special (decoding with skip_special_tokens drops them)."""
        return tuple(t.content for t in self._tok.get_added_tokens_decoder().values() if t.special)

    @functools.cached_property
    def control_texts(self) -> tuple[str, ...]:
        """The text forms of the control tokens (`<｜User｜>`, `<｜tool▁calls▁begin｜>`, `<think>`, ...): every
        added token, special or not. DeepSeek's released tokenizer.json flags only BOS/EOS/pad special, so
        the role and tool-call markers are added tokens that encoding would match in any text."""
        return tuple(t.content for t in self._tok.get_added_tokens_decoder().values())

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    max_seconds: float | None = None, max_chars: int | None = None,
                    tools: list[dict] | None = None, template_kwargs: dict | None = None) -> str:
        """The chat template's text for `messages`. Rendering is bounded in time and size (a template
        may loop or multiply strings without end): past either bound it raises TemplateLimitError.
        `tools` (OpenAI function tools) reach the template as its `tools` variable, and
        `template_kwargs` as further variables (V3.1's `thinking`)."""
        extra = dict(template_kwargs or {})
        reserved = sorted(set(extra) & TEMPLATE_VARIABLES)
        if reserved:
            raise RequestError(f"chat_template_kwargs may not set {', '.join(reserved)}: the server sets "
                               f"{', '.join(sorted(TEMPLATE_VARIABLES))} itself")
        if tools is not None:
            extra["tools"] = tools
        if not self.chat_template:
            raise CheckpointError("this checkpoint's tokenizer_config.json has no chat_template; "
                                  "use plain prompts instead of chat mode")
        env = _BoundedSandbox(RENDER_SECONDS if max_seconds is None else max_seconds,
                              RENDER_CHARS if max_chars is None else max_chars, trim_blocks=True, lstrip_blocks=True)
        try:
            template = env.from_string(self.chat_template)
        except RecursionError:
            raise TemplateLimitError("the chat template nests too deeply to compile") from None
        pieces, size = [], 0
        try:
            for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                           bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra):
                size += len(piece)
                env.check(size)
                pieces.append(piece)
        except RecursionError:
            raise TemplateLimitError("the chat template recursed too deeply") from None
        return "".join(pieces)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> list[int]:
        """Token ids of the rendered conversation (the template writes the BOS token itself)."""
        return self.chat_prompt(messages, tools, template_kwargs)[1]

    @functools.cached_property
    def template_variables(self) -> frozenset[str]:
        """The variables the chat template reads from its caller (`messages`, `tools`, `thinking`, ...)."""
        if not self.chat_template:
            return frozenset()
        from jinja2 import meta
        return frozenset(meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(self.chat_template)))

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> tuple[str, list[int]]:
        """(the rendered conversation, its token ids).

        Control tokens come from the template only: text in a message that spells one (a user typing
        `<｜Assistant｜>`) is encoded as plain text, so it cannot forge a turn, as the peers do."""
        rendered = self.render_chat(messages, tools=tools, template_kwargs=template_kwargs)
        contents = [m.get("content") for m in messages]
        if not any(isinstance(c, str) and any(t in c for t in self.control_texts) for c in contents):
            return rendered, self.encode(rendered, add_bos=False)
        # Render again with each content replaced by a marker; the template's text between markers
        # is encoded with control tokens, each content without.
        marked = [dict(m, content=_MARK.format(i)) if isinstance(m.get("content"), str) else m
                  for i, m in enumerate(messages)]
        template_text = self.render_chat(marked, tools=tools, template_kwargs=template_kwargs)
        parts = _MARK_RE.split(template_text)     # text, index, text, index, ..., text
        if "".join(p if j % 2 == 0 else contents[int(p)] for j, p in enumerate(parts)) != rendered:
            raise TemplateLimitError("a message contains the text of a control token and this chat template "
                                     "transforms message contents, so it cannot be encoded as plain text; remove "
                                     "the control-token text from the message")
        ids = []
        for j, p in enumerate(parts):
            if j % 2 == 0:
                ids += self._tok.encode(p, add_special_tokens=False).ids if p else []
                continue
            # a message may end in text of the server's own (`trusted_tail`: the tools it describes,
            # with the call format's control tokens), encoded like the template's text
            content, tail = contents[int(p)], messages[int(p)].get("trusted_tail") or ""
            own = content[: len(content) - len(tail)] if tail and content.endswith(tail) else content
            ids += self._plain.encode(own, add_special_tokens=False).ids if own else []
            if own is not content:
                ids += self._tok.encode(tail, add_special_tokens=False).ids
        return rendered, ids

    @functools.cached_property
    def _plain(self):
        """A second tokenizer that reads control-token text as plain text (one of our own, so the
        setting never races with encodes on another thread)."""
        import json

        from tokenizers import Tokenizer as HFTokenizer
        data = json.loads(self._tok.to_str())
        for added in data.get("added_tokens", []):   # non-special markers too: only special ones can be split
            added["special"] = True
        plain = HFTokenizer.from_str(json.dumps(data))
        plain.encode_special_tokens = True
        return plain


TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "tools"})
_WIDTH_FILTERS = {"do_center", "do_indent", "do_wordwrap", "do_truncate", "do_format", "do_batch", "do_slice"}


class TemplateLimitError(RequestError):
    """The chat template could not be rendered within its bounds, or safely."""


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with a deadline and a size bound. Every call, attribute or item
    lookup, arithmetic operator and filter checks the clock, and operations that build strings or
    lists refuse results larger than the bound before building them (`'x' * 4000000000`)."""

    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def __init__(self, max_seconds: float, max_chars: int, **kwargs):
        super().__init__(**kwargs)
        self.deadline, self.max_seconds, self.max_chars = time.monotonic() + max_seconds, max_seconds, max_chars
        self.filters = {name: self._bounded_filter(f) for name, f in self.filters.items()}

    def check(self, size: int = 0) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"the chat template took over {self.max_seconds:g} s to render")
        if size > self.max_chars:
            raise TemplateLimitError(f"the chat template's output exceeds {self.max_chars} characters")

    def _sized(self, value):
        if isinstance(value, (str, list, tuple)):
            self.check(len(value))
        return value

    def call_binop(self, context, operator, left, right):
        self.check()
        if operator == "*" and isinstance(left, int) and not isinstance(right, int):
            left, right = right, left
        if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
            self.check(len(left) * max(right, 0))
        elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise TemplateLimitError(f"the chat template raises a number to the power {right}")
        elif operator == "%" and isinstance(left, str):
            self.check(len(left) + sum(len(str(x)) for x in (right if isinstance(right, tuple) else (right,))))
            if re.search(r"%[-+ #0]*(\d{5,}|\*)", left):
                raise TemplateLimitError("the chat template formats with a field width over 9999")
        return self._sized(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        __self.check()
        if any(isinstance(a, int) and a > __self.max_chars for a in (*args, *kwargs.values())):
            raise TemplateLimitError(f"the chat template calls {getattr(__obj, '__name__', 'a function')} "
                                     f"with a size over {__self.max_chars}")
        return __self._sized(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        self.check()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.check()
        return super().getitem(obj, argument)

    def _bounded_filter(self, f):
        def bounded(*args, **kwargs):
            self.check()
            values = [a for a in (*args, *kwargs.values()) if not hasattr(a, "environment")]   # not the context
            if (f.__name__ in _WIDTH_FILTERS
                    and any(isinstance(a, int) and not isinstance(a, bool) and a > 9999 for a in values[1:])):
                raise TemplateLimitError(f"the chat template calls the filter {f.__name__.removeprefix('do_')} "
                                         f"with a width over 9999")
            strings = [len(a) for a in values if isinstance(a, str)]
            if f.__name__ == "do_replace" and len(strings) >= 3:    # s | replace(old, new): up to len(s) * len(new)
                self.check(strings[0] * max(strings[2], 1))
            return self._sized(f(*args, **kwargs))
        for attr in ("jinja_pass_arg",):                        # keep Jinja's context/eval-context passing
            if hasattr(f, attr):
                setattr(bounded, attr, getattr(f, attr))
        bounded.__name__ = getattr(f, "__name__", "filter")
        return bounded
