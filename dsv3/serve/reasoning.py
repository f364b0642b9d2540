"""Reasoning: the text a thinking model writes before `</think>`, split from its answer.

DeepSeek-R1's template opens the reasoning in the prompt (the generation prompt ends `<think>\\n`),
and so does V3.1's with `thinking=true` (`<think>`); V3.1 without it closes it (`</think>`), and V3
knows no reasoning. So whether an answer starts inside its reasoning is read off the rendered
prompt, and the output never shows the opening tag. A template that knows `</think>` but did not
open it lets the model open it itself: a leading `<think>` is then read as the start of reasoning.
"""
from __future__ import annotations

from dataclasses import dataclass

THINK_START, THINK_END = "<think>", "</think>"


def reasoning_mode(template: str | None, prompt_text: str) -> str | None:
    """"open" when the prompt opened the reasoning, "may_open" when the template knows reasoning and
    the prompt left it to the model, None when this answer has no reasoning to split off."""
    if not template or THINK_END not in template:
        return None
    tail = prompt_text.rstrip()
    if tail.endswith(THINK_START):
        return "open"
    if tail.endswith(THINK_END):
        return None
    return "may_open"


def _held_tail(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ReasoningParser:
    """feed(text) -> (reasoning, content) as the output streams; finish() flushes what was held."""
    state: str                 # "open" (inside the reasoning) | "may_open" (at the start) | "answer"
    pending: str = ""

    def feed(self, text: str) -> tuple[str, str]:
        p = self.pending + text
        self.pending = ""
        if self.state == "may_open":
            stripped = p.lstrip()
            if stripped.startswith(THINK_START):
                p, self.state = stripped[len(THINK_START):], "open"
            elif THINK_START.startswith(stripped):
                self.pending = p            # `<thi`: wait for the rest
                return "", ""
            else:
                self.state = "answer"
        if self.state == "answer":
            return "", p
        i = p.find(THINK_END)
        if i >= 0:
            self.state = "answer"
            return p[:i], p[i + len(THINK_END):]
        keep = _held_tail(p, THINK_END)
        self.pending = p[len(p) - keep:]
        return p[: len(p) - keep], ""

    def finish(self) -> tuple[str, str]:
        """The output ended: held text belongs to the reasoning (if still inside it) or the answer."""
        p, self.pending = self.pending, ""
        return (p, "") if self.state == "open" else ("", p)
