"""A chat answer's text, as it streams, turned into OpenAI message fields: reasoning_content (before
`</think>`, dsv3.serve.reasoning), then content and tool_calls (dsv3.serve.tool_parsers)."""
from __future__ import annotations

from dsv3.serve.reasoning import ReasoningParser
from dsv3.serve.tool_parsers import ArgumentsPiece, CallStart, Content, ToolCallParser, collect


class ChatOutput:
    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallParser | None):
        self.reasoning, self.tools = reasoning, tools
        self.reasoning_text: list[str] = []
        self.events: list = []            # the tool parser's events (or Content) over the whole answer

    def feed(self, text: str) -> dict:
        """The delta for this piece of output text: any of reasoning_content, content, tool_calls."""
        reasoning, answer = self.reasoning.feed(text) if self.reasoning else ("", text)
        return self._delta(reasoning, answer, final=False)

    def finish(self) -> dict:
        """The delta of what was held back when the output ends."""
        reasoning, answer = self.reasoning.finish() if self.reasoning else ("", "")
        return self._delta(reasoning, answer, final=True)

    def _delta(self, reasoning: str, answer: str, final: bool) -> dict:
        if self.tools is None:
            events = [Content(answer)] if answer else []
        else:
            events = self.tools.feed(answer) if answer else []
            if final:
                events += self.tools.finish()
        self.events += events
        self.reasoning_text.append(reasoning)
        delta: dict = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        content = "".join(e.text for e in events if isinstance(e, Content))
        if content:
            delta["content"] = content
        calls: list[dict] = []
        for e in events:
            if isinstance(e, CallStart):
                calls.append({"index": e.index, "id": e.id, "type": "function",
                              "function": {"name": e.name, "arguments": ""}})
            elif isinstance(e, ArgumentsPiece):
                if calls and calls[-1]["index"] == e.index:
                    calls[-1]["function"]["arguments"] += e.text
                else:
                    calls.append({"index": e.index, "function": {"arguments": e.text}})
        if calls:
            delta["tool_calls"] = calls
        return delta

    @property
    def called(self) -> bool:
        """Did the answer (so far) start a tool call?"""
        return bool(self.tools and self.tools.calls)

    def message(self) -> dict:
        """The whole answer after finish(), as a non-streamed message: a call cut off before its end
        marker is content there (tool_parsers.collect)."""
        if self.tools is not None:
            content, calls = collect(self.tools, self.events)
        else:
            content, calls = "".join(e.text for e in self.events), []
        reasoning = "".join(self.reasoning_text) if self.reasoning is not None else ""
        # an answer that is all tool calls or all reasoning (cut off before `</think>`) has null content
        msg: dict = {"role": "assistant", "content": content if content or not (calls or reasoning) else None}
        if self.reasoning is not None:
            msg["reasoning_content"] = reasoning or None
        if calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in calls]
        return msg
