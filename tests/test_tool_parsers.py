"""Tool-call parsing (dsv3/serve/tool_parsers.py) from fixed model outputs in both DeepSeek formats:
the format is detected from the V3, R1 and V3.1 templates themselves; whole outputs give the calls
and the content around them; streaming gives the same answer however the text is cut (token by
token through the real tokenizer, at every character boundary); malformed and truncated outputs
become content, never an exception."""
import pytest

from dsv3.core.tokenizer import Tokenizer
from dsv3.serve.chat_output import ChatOutput
from dsv3.serve.tool_parsers import CALL_BEGIN, CALLS_BEGIN, CALLS_END, SEP, V3, V3_1, ToolCallParser, collect, \
    detect_format

from helpers import make_chat_checkpoint

CALLS = [("get_weather", '{"city": "Paris", "days": 3}'), ("ping", "{}")]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    return {f: Tokenizer(make_chat_checkpoint(tmp_path_factory.mktemp(f.replace(".", "")) / "tiny", f))
            for f in ("v3", "r1", "v3.1")}


def parse(fmt, pieces: list[str]):
    """(content, [(name, arguments)] of complete calls, the events) from output text in pieces."""
    parser = ToolCallParser(fmt)
    events = [e for p in pieces for e in parser.feed(p)] + parser.finish()
    content, calls = collect(parser, events)
    return content, [(c.name, c.arguments) for c in calls], events


def token_pieces(tok: Tokenizer, text: str) -> list[str]:
    """`text` as the engine streams it: the newly decoded text after each token (held while a
    character is incomplete)."""
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    pieces, shown = [], ""
    for i in range(1, len(ids) + 1):
        now = tok.decode(ids[:i]).rstrip("\ufffd")
        pieces.append(now[len(shown):])
        shown = now
    return pieces


@pytest.mark.parametrize("family, fmt", [("v3", V3), ("r1", V3), ("v3.1", V3_1)])
def test_format_is_read_off_the_template(toks, family, fmt):
    tok = toks[family]
    assert detect_format(lambda m: tok.render_chat(m, add_generation_prompt=False)) is fmt
    # the template writes an earlier turn's calls exactly as the parser reads them
    history = [{"role": "user", "content": "u"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": n, "arguments": a}} for n, a in CALLS]}]
    text = tok.render_chat(history, add_generation_prompt=False)
    start = text.index(CALLS_BEGIN)
    assert parse(fmt, [text[start:]])[1] == CALLS


def test_a_template_without_tool_calls_has_no_format():
    assert detect_format(lambda m: "".join(x["content"] or "" for x in m)) is None
    assert detect_format(lambda m: 1 / 0) is None


@pytest.mark.parametrize("fmt", [V3, V3_1])
@pytest.mark.parametrize("text, content, calls", [
    ("Just an answer.", "Just an answer.", []),
    ("Let me look." + "{calls}", "Let me look.", CALLS),
    ("{calls}", "", CALLS),
    ("{one}", "", CALLS[:1]),
    ("{calls} and after", " and after", CALLS),
    (CALLS_BEGIN + CALLS_END, CALLS_BEGIN + CALLS_END, []),                     # an empty list calls nothing
    ("a < b and <｜tool▁calls", "a < b and <｜tool▁calls", []),                   # a marker's start, cut off
])
def test_whole_outputs(fmt, text, content, calls):
    text = text.format(calls=fmt.render(CALLS), one=fmt.render(CALLS[:1]))
    got_content, got_calls, _ = parse(fmt, [text])
    assert (got_content, got_calls) == (content, calls)


@pytest.mark.parametrize("fmt", [V3, V3_1])
@pytest.mark.parametrize("broken", [
    CALLS_BEGIN + "garbage" + CALLS_END,                                         # no call marker
    CALLS_BEGIN + CALL_BEGIN + "x" * 300 + SEP + "{}",                           # a header too long to be a name
    CALLS_BEGIN + CALL_BEGIN + SEP + "{}<｜tool▁call▁end｜>" + CALLS_END,           # no name
    CALLS_BEGIN + CALL_BEGIN + "two\nlines" + SEP + "{}",                       # a name across lines
])
def test_malformed_outputs_are_content(fmt, broken):
    text = "Sure: " + broken
    content, calls, _ = parse(fmt, [text])
    assert calls == [] and content == text


def test_a_malformed_part_after_good_calls_is_content():
    text = V3.render(CALLS)[: -len(CALLS_END)] + "\nnot a call" + CALLS_END
    content, calls, _ = parse(V3, [text])
    assert calls == CALLS and content == "\nnot a call" + CALLS_END


@pytest.mark.parametrize("family, fmt", [("v3", V3), ("v3.1", V3_1)])
def test_streamed_answers_equal_the_whole_answer_however_cut(toks, family, fmt):
    samples = ["plain text, no calls", "I will call. " + fmt.render(CALLS), fmt.render(CALLS) + " done",
               "Sure: " + CALLS_BEGIN + "garbage" + CALLS_END]
    for text in samples:
        whole = parse(fmt, [text])[:2]
        cuts = [token_pieces(toks[family], text), list(text)]
        cuts += [[text[:i], text[i:]] for i in range(1, len(text))]
        for pieces in cuts:
            assert parse(fmt, pieces)[:2] == whole, pieces


@pytest.mark.parametrize("fmt", [V3, V3_1])
def test_truncated_at_every_point(fmt):
    """Cut anywhere, the answer keeps the calls that ended; the rest after them is content."""
    before = "Checking. "
    text = before + fmt.render(CALLS)
    ends = [text.index(fmt.call_end, text.index(fmt.call_begin(n))) + len(fmt.call_end) for n, _ in CALLS]
    for k in range(len(text) + 1):
        cut = text[:k]
        done = [i for i, e in enumerate(ends) if e <= k]
        content, calls, events = parse(fmt, list(cut))          # streamed char by char
        assert calls == CALLS[: len(done)], k
        if not done:
            assert content == cut, k
        elif k < len(text):
            assert content == before + cut[ends[done[-1]]:], k
        else:
            assert content == before, k


def test_streamed_deltas_assemble_as_an_openai_client_does(toks):
    """Each call's id, type and name come first, then its arguments in pieces; assembled by index."""
    text = "Let me check. " + V3.render(CALLS)
    out = ChatOutput(None, ToolCallParser(V3))
    deltas = [out.feed(p) for p in token_pieces(toks["v3"], text)] + [out.finish()]
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for c in d.get("tool_calls", []):
            if "id" in c:
                assert c["index"] not in calls and c["type"] == "function" and c["function"]["arguments"] == ""
                calls[c["index"]] = {"id": c["id"], "name": c["function"]["name"], "arguments": ""}
            else:
                calls[c["index"]]["arguments"] += c["function"]["arguments"]
    assert content == "Let me check. "
    assert [(c["name"], c["arguments"]) for c in calls.values()] == CALLS
    pieces_per_call = [sum(1 for d in deltas for c in d.get("tool_calls", []) if c["index"] == i and "id" not in c)
                       for i in range(2)]
    assert pieces_per_call[0] > 1                               # the arguments streamed in several pieces
    message = out.message()
    assert message["content"] == "Let me check. "
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == CALLS
    assert [c["id"] for c in message["tool_calls"]] == [c["id"] for c in calls.values()]
    assert out.called


def test_a_cut_off_call_is_content_in_the_whole_answer():
    text = "Hmm. " + V3.render(CALLS)[: len(CALLS_BEGIN + V3.call_begin("get_weather")) + 5]   # in its arguments
    out = ChatOutput(None, ToolCallParser(V3))
    out.feed(text)
    out.finish()
    assert out.message() == {"role": "assistant", "content": text}
    assert out.called                                           # streamed, the call had started


@pytest.mark.parametrize("fmt", [V3, V3_1])
def test_random_marker_soup_never_raises_and_streams_like_the_whole(fmt):
    """Outputs built from pieces of the format (markers, names, fences, JSON, text), cut at random:
    parsing never raises, and the streamed parse equals the whole one."""
    import random
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    pieces = [CALLS_BEGIN, CALLS_END, CALL_BEGIN, "<｜tool▁call▁end｜>", SEP, "function", "get_weather", "\n",
              "```json", "```", '{"a": 1}', "text ", "<｜tool▁", "｜>", " "]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 14)))
        whole = parse(fmt, [text])[:2]
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(0, 6)))) if len(text) > 1 else []
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert parse(fmt, chunks)[:2] == whole, (seed, text, chunks)
        content, calls = whole
        assert all(name for name, _ in calls), (seed, text)
        if not calls:                                   # nothing was called: all of it is content, unchanged
            assert content == text, (seed, text)
