"""Tool calls in DeepSeek's two output formats, parsed back from the model's text (streamed or whole).

The checkpoints' own chat templates write an assistant's tool calls in one of two ways (see
../shared/reference/), and the model answers in the same way:

    V3 / V3-0324 / R1   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
                        (further calls after a "\\n") <｜tool▁calls▁end｜>
    V3.1                <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

detect_format() tells them apart by rendering a conversation with one tool call through the
template. ToolCallParser reads output text as it streams: text before the calls is content; a call
is announced (index, id, name) once its name is complete and its arguments follow in pieces, as
OpenAI streams them. Output that breaks the format becomes content: everything since the opening
marker while no call has started yet, otherwise the broken part. A call cut off by max_tokens is
content in the whole (non-streamed) answer; streamed, its arguments have already gone out and the
finish_reason "length" says it is incomplete.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from dsv3.core import grammar

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
FENCE_OPEN, FENCE_CLOSE = "\n```json\n", "\n```"
MAX_NAME_CHARS = 256           # a call header longer than this is not a call


@dataclass(frozen=True)
class ToolCallFormat:
    """How a template writes one tool call; `fenced` is V3's: a `function` type and a fenced JSON block."""
    name: str                  # "deepseek_v3" | "deepseek_v3.1"
    fenced: bool

    def call_begin(self, name: str) -> str:
        """Everything before a call's arguments."""
        return CALL_BEGIN + (f"function{SEP}{name}{FENCE_OPEN}" if self.fenced else f"{name}{SEP}")

    @property
    def call_end(self) -> str:
        return (FENCE_CLOSE if self.fenced else "") + CALL_END

    @property
    def separator(self) -> str:
        """Between two calls."""
        return "\n" if self.fenced else ""

    def render(self, calls: list[tuple[str, str]]) -> str:
        """(name, arguments JSON) calls as the model writes them."""
        body = self.separator.join(self.call_begin(n) + a + self.call_end for n, a in calls)
        return CALLS_BEGIN + body + CALLS_END

    def grammar(self, tools: list[dict], parallel: bool) -> grammar.GrammarSpec:
        """The output of a forced or required tool choice: calls of `tools` (OpenAI function tools),
        each with arguments valid under its function's `parameters`."""
        shapes = [grammar.ToolCallShape(self.call_begin(t["function"]["name"]),
                                        t["function"].get("parameters") or {"type": "object"}, self.call_end)
                  for t in tools]
        return grammar.tool_calls(shapes, CALLS_BEGIN, self.separator, CALLS_END, parallel)


V3 = ToolCallFormat("deepseek_v3", fenced=True)
V3_1 = ToolCallFormat("deepseek_v3.1", fenced=False)


def detect_format(render) -> ToolCallFormat | None:
    """The format a chat template writes tool calls in, from `render(messages)` (the template's text
    for a conversation); None when it writes neither (the template cannot carry tool calls)."""
    probe = [{"role": "user", "content": "u"},
             {"role": "assistant", "content": None,
              "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "NAME", "arguments": "ARGS"}}]}]
    try:
        text = render(probe)
    except Exception:  # noqa: BLE001 - a template that cannot render a tool call has no format
        return None
    for fmt in (V3, V3_1):
        if fmt.call_begin("NAME") + "ARGS" + fmt.call_end in text:
            return fmt
    return None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False     # its end marker was seen
    raw: str = ""              # the text it was parsed from (a cut-off call becomes this content)


@dataclass
class Content:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class ArgumentsPiece:
    index: int
    text: str


def _held_tail(text: str, *markers: str) -> int:
    """Length of the longest end of `text` that begins one of `markers` (it may complete later)."""
    best = 0
    for m in markers:
        for n in range(min(len(text), len(m) - 1), best, -1):
            if m.startswith(text[-n:]):
                best = n
                break
    return best


@dataclass
class ToolCallParser:
    """feed(text) -> events (Content, CallStart, ArgumentsPiece); finish() -> the last events."""
    fmt: ToolCallFormat
    calls: list[ToolCall] = field(default_factory=list)
    state: str = "text"        # text | calls | header | arguments | after (the calls ended) | plain (broken)
    pending: str = ""          # text read but not yet classified
    unsettled: str = ""        # text consumed since the calls began (or the last call ended), not yet emitted

    def feed(self, text: str) -> list:
        self.pending += text
        events: list = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list:
        """End of output: held text is content; a call without its end marker stays incomplete."""
        events: list = []
        if self.state == "arguments":
            call = self.calls[-1]
            piece = self.pending
            call.arguments += piece
            call.raw += piece
            if piece:
                events.append(ArgumentsPiece(len(self.calls) - 1, piece))
        elif self.unsettled + self.pending:
            events.append(Content(self.unsettled + self.pending))
        self.pending = self.unsettled = ""
        self.state = "after"
        return events

    # -- the state machine -------------------------------------------------------------------------
    def _step(self, events: list) -> bool:
        """Consume what the current state can; True if another step may consume more."""
        p = self.pending
        if self.state in ("after", "plain"):
            if p:
                events.append(Content(p))
            self.pending = ""
            return False
        if self.state == "text":
            i = p.find(CALLS_BEGIN)
            if i < 0:
                keep = _held_tail(p, CALLS_BEGIN)
                if len(p) > keep:
                    events.append(Content(p[: len(p) - keep]))
                self.pending = p[len(p) - keep:]
                return False
            if i:
                events.append(Content(p[:i]))
            self._consume(len(CALLS_BEGIN), p[i:])
            self.state = "calls"
            return True
        if self.state == "calls":
            stripped = p.lstrip()
            if stripped.startswith(CALL_BEGIN):
                self._consume(len(p) - len(stripped) + len(CALL_BEGIN), p)
                self.state = "header"
                return True
            if stripped.startswith(CALLS_END):
                self._consume(len(p) - len(stripped) + len(CALLS_END), p)
                if not self.calls:                  # an empty list of calls: nothing was called
                    events.append(Content(self.unsettled))
                self.unsettled = ""
                self.state = "after"
                return True
            if CALL_BEGIN.startswith(stripped) or CALLS_END.startswith(stripped):
                return False                        # a marker may still be arriving
            return self._broken(events)
        if self.state == "header":
            header = self._header(p)
            if header is None:
                return False
            if header is False:
                return self._broken(events)
            name, length = header
            header = p[:length]
            self.pending = p[length:]
            call = ToolCall(new_call_id(), name, raw=self.unsettled + header)
            self.calls.append(call)
            self.unsettled = ""
            events.append(CallStart(len(self.calls) - 1, call.id, name))
            self.state = "arguments"
            return True
        # arguments: stream them, holding back what may begin the call's end marker
        call, index = self.calls[-1], len(self.calls) - 1
        i = p.find(CALL_END)
        if i >= 0:
            piece = p[:i]
            if self.fmt.fenced and piece.endswith(FENCE_CLOSE):
                piece = piece[: -len(FENCE_CLOSE)]
            self.pending = p[i + len(CALL_END):]
            call.raw += p[: i + len(CALL_END)]
            call.complete = True
            self.state = "calls"
        else:
            keep = _held_tail(p, self.fmt.call_end, CALL_END)
            piece = p[: len(p) - keep]
            self.pending = p[len(p) - keep:]
            call.raw += piece
        call.arguments += piece
        if piece:
            events.append(ArgumentsPiece(index, piece))
        return i >= 0

    def _header(self, p: str) -> tuple[str, int] | bool | None:
        """(the call's name, the header's length) once the header is complete; None while it may
        still complete; False when it cannot be a call header."""
        end = FENCE_OPEN if self.fmt.fenced else SEP
        i = p.find(end)
        head = p[:i] if i >= 0 else p[: len(p) - _held_tail(p, end)]
        if len(head) > MAX_NAME_CHARS + len(f"function{SEP}") or "<｜tool▁call" in head:
            return False
        if self.fmt.fenced:
            kind, sep, name = head.partition(SEP)
            if not (f"function{SEP}".startswith(head) or (kind == "function" and sep)):
                return False
        else:
            name = head
        if "\n" in name:
            return False
        if i < 0:
            return None
        if not name.strip():
            return False
        return name.strip(), i + len(end)

    def _consume(self, n: int, p: str) -> None:
        self.unsettled += p[:n]
        self.pending = p[n:]

    def _broken(self, events: list) -> bool:
        """The output left the format: what was held since the calls began (or the last call) is content."""
        events.append(Content(self.unsettled + self.pending))
        self.unsettled = self.pending = ""
        self.state = "plain"
        return False


def collect(parser: ToolCallParser, events: list) -> tuple[str, list[ToolCall]]:
    """The whole answer from all of a parse's events: (content, complete calls). A call cut off
    before its end marker is content (its raw text), as is any malformed part."""
    content = "".join(e.text for e in events if isinstance(e, Content))
    complete = [c for c in parser.calls if c.complete]
    content += "".join(c.raw for c in parser.calls if not c.complete)
    return content, complete
