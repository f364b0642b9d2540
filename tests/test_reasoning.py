"""Reasoning (dsv3/serve/reasoning.py): which answers start inside their reasoning, read off the
rendered prompts of the R1, V3.1 and V3 templates (with chat_template_kwargs); the split at
`</think>` from fixed outputs, whole and streamed token by token or cut at every character; a
model that opens `<think>` itself; truncated reasoning; reasoning followed by tool calls."""
import pytest

from dsv3.core.tokenizer import Tokenizer
from dsv3.serve.chat_output import ChatOutput
from dsv3.serve.reasoning import ReasoningParser, reasoning_mode
from dsv3.serve.tool_parsers import V3, V3_1, ToolCallParser

from helpers import make_chat_checkpoint

CHAT = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    return {f: Tokenizer(make_chat_checkpoint(tmp_path_factory.mktemp(f.replace(".", "")) / "tiny", f))
            for f in ("v3", "r1", "v3.1")}


@pytest.mark.parametrize("family, kwargs, mode, ending", [
    ("r1", None, "open", "<｜Assistant｜><think>\n"),
    ("v3.1", {"thinking": True}, "open", "<｜Assistant｜><think>"),
    ("v3.1", None, None, "<｜Assistant｜></think>"),
    ("v3.1", {"thinking": False}, None, "<｜Assistant｜></think>"),
    ("v3", None, None, "<｜Assistant｜>"),
])
def test_mode_is_read_off_the_rendered_prompt(toks, family, kwargs, mode, ending):
    tok = toks[family]
    text, ids = tok.chat_prompt(CHAT, template_kwargs=kwargs)
    assert text.endswith(ending)
    assert reasoning_mode(tok.chat_template, text) == mode
    assert tok.decode(ids).endswith(ending)                  # the markers are tokens that decoding keeps


def test_a_template_that_leaves_it_to_the_model():
    template = "{{ messages[0]['content'] }}<｜Assistant｜>{# the model may write <think>...</think> #}"
    assert reasoning_mode(template, "hi<｜Assistant｜>") == "may_open"


def split(mode: str, pieces: list[str]) -> tuple[str, str]:
    p = ReasoningParser(mode)
    out = [p.feed(x) for x in pieces] + [p.finish()]
    return "".join(r for r, _ in out), "".join(c for _, c in out)


def token_pieces(tok: Tokenizer, text: str) -> list[str]:
    ids = tok.encode(text, add_bos=False)
    pieces, shown = [], ""
    for i in range(1, len(ids) + 1):
        now = tok.decode(ids[:i]).rstrip("\ufffd")
        pieces.append(now[len(shown):])
        shown = now
    return pieces


@pytest.mark.parametrize("mode, text, reasoning, content", [
    ("open", "\nLet me think: 2 + 2.\n</think>\n\nIt is 4.", "\nLet me think: 2 + 2.\n", "\n\nIt is 4."),
    ("open", "all thought, cut off by max_tokens", "all thought, cut off by max_tokens", ""),
    ("open", "cut inside the tag </thi", "cut inside the tag </thi", ""),
    ("open", "</think>no reasoning at all", "", "no reasoning at all"),
    ("open", "a <think> inside is text</think>x", "a <think> inside is text", "x"),
    ("may_open", "<think>hmm</think>answer", "hmm", "answer"),
    ("may_open", "\n<think>hmm</think>answer", "hmm", "answer"),
    ("may_open", "an answer with no reasoning", "", "an answer with no reasoning"),
    ("may_open", "<thi", "", "<thi"),
    ("may_open", "answer, then </think> is text", "", "answer, then </think> is text"),
])
def test_split_however_cut(toks, mode, text, reasoning, content):
    assert split(mode, [text]) == (reasoning, content)
    assert split(mode, list(text)) == (reasoning, content)
    assert split(mode, token_pieces(toks["r1"], text)) == (reasoning, content)
    for i in range(1, len(text)):
        assert split(mode, [text[:i], text[i:]]) == (reasoning, content), i


@pytest.mark.parametrize("fmt", [V3, V3_1])
def test_reasoning_then_tool_calls(toks, fmt):
    calls = [("get_weather", '{"city": "Oslo"}')]
    text = "The user wants weather.</think>" + fmt.render(calls)
    out = ChatOutput(ReasoningParser("open"), ToolCallParser(fmt))
    deltas = [out.feed(p) for p in token_pieces(toks["r1"], text)] + [out.finish()]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user wants weather."
    assert "".join(d.get("content", "") for d in deltas) == ""
    message = out.message()
    assert message["reasoning_content"] == "The user wants weather." and message["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == calls
    # no reasoning in an answer without it: the field is null, not ""
    out = ChatOutput(ReasoningParser("open"), None)
    out.feed("</think>just this")
    out.finish()
    assert out.message() == {"role": "assistant", "content": "just this", "reasoning_content": None}
    # reasoning cut off by max_tokens: no answer yet, null content
    out = ChatOutput(ReasoningParser("open"), None)
    out.feed("still thinking")
    out.finish()
    assert out.message() == {"role": "assistant", "content": None, "reasoning_content": "still thinking"}
