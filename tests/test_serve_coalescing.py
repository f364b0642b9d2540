"""A stream whose event loop is behind its engine: what is queued for a choice when its stream wakes
goes out as one chunk (several tokens' text, all their logprobs entries in order, the last one's
finish_reason), and the client, the official `openai` one, reads the same answer as from a stream
that got every step on its own: text, logprobs (chat and legacy, with echo), n choices, one finish
per choice, usage, tool calls and reasoning."""
import asyncio

import pytest

openai = pytest.importorskip("openai", reason="needs the test extra: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install -e '.[serve]'")

from dsv3 import LLM  # noqa: E402
from dsv3.serve.app import ServedModel, ServeOptions  # noqa: E402
from dsv3.serve.server import ServerThread  # noqa: E402
from dsv3.serve.worker import Delta, EngineWorker, Handle, _deliver_to_loops  # noqa: E402

from helpers import make_chat_checkpoint, make_checkpoint, tiny_config  # noqa: E402
from test_serve_tools import ASK, TOOLS, Script, streamed  # noqa: E402
from dsv3.serve.tool_parsers import V3  # noqa: E402

MODEL = "tiny"
pytestmark = pytest.mark.usefixtures("one_thread")


class BunchedWorker(EngineWorker):
    """An engine thread whose events reach the event loop `every` steps at a time (and at once when a
    request is accepted or a choice ends): what a stream sees when its event loop is behind."""

    def __init__(self, engine, every: int):
        super().__init__(engine)
        self.every, self.held, self.steps = every, [], 0

    def submit_choices(self, prompt_ids, params):
        loop = asyncio.get_running_loop()
        handles = [Handle(prompt_ids, p, loop) for p in params]
        for h in handles:
            h.deliver = self._bunch
        self.put(("add", handles))
        return handles

    def _bunch(self, pairs) -> None:           # engine thread
        self.held += pairs
        self.steps += 1
        ends = any(not isinstance(e, Delta) or e.finish_reason is not None for _, e in pairs)
        if ends or self.steps % self.every == 0:
            held, self.held = self.held, []
            _deliver_to_loops(held)


def _serve(llm, every: int | None) -> ServerThread:
    worker = EngineWorker(llm.engine) if every is None else BunchedWorker(llm.engine, every)
    return ServerThread(None, ServeOptions(MODEL), worker=worker, model=ServedModel.of(llm))


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("co") / "tiny", tiny_config(), seed=61, std=0.3)
    return LLM(path, backend="cpu", **{"kv_cache.block_size": 16})


def _completion(server, **extra):
    chunks = list(_client(server).completions.create(
        model=MODEL, prompt="hello world", max_tokens=24, temperature=0, logprobs=3, echo=True, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **extra))
    choices = [c.choices[0] for c in chunks if c.choices]
    lp = {key: [x for c in choices for x in getattr(c.logprobs, key)]
          for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    finishes = [c.finish_reason for c in choices if c.finish_reason is not None]
    return "".join(c.text for c in choices), lp, finishes, choices, chunks[-1].usage


def test_a_completion_behind_its_engine_streams_every_token_once(llm):
    with _serve(llm, None) as server:
        want_text, want_lp, want_finish, each, _ = _completion(server)
    with _serve(llm, 5) as server:
        text, lp, finishes, merged, usage = _completion(server)
    assert (text, lp) == (want_text, want_lp)
    assert want_finish == finishes == ["length"] and merged[-1].finish_reason == "length"
    assert usage.completion_tokens == 24
    assert len(lp["tokens"]) == len(llm.tokenizer.encode("hello world")) + 24
    # coalesced: fewer chunks, and some carry several tokens' logprobs
    assert len(merged) < len(each) and max(len(c.logprobs.tokens) for c in merged[1:]) > 1


def _chat(server):
    stream = _client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello world"}], max_tokens=20, n=2, temperature=0,
        logprobs=True, top_logprobs=2, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    text, entries, finishes, chunks, usage = {}, {}, {}, {}, None
    for c in stream:
        usage = c.usage or usage
        for ch in c.choices:
            text[ch.index] = text.get(ch.index, "") + (ch.delta.content or "")
            entries.setdefault(ch.index, []).extend(
                (e.token, e.logprob, tuple(e.bytes), tuple((t.token, t.logprob) for t in e.top_logprobs))
                for e in (ch.logprobs.content if ch.logprobs else []))
            finishes.setdefault(ch.index, []).extend([ch.finish_reason] if ch.finish_reason else [])
            chunks[ch.index] = chunks.get(ch.index, 0) + 1
    return text, entries, finishes, chunks, usage


def test_chat_choices_behind_their_engine_keep_their_logprobs_and_one_finish(llm):
    with _serve(llm, None) as server:
        want_text, want_entries, want_finish, each, _ = _chat(server)
    with _serve(llm, 4) as server:
        text, entries, finishes, merged, usage = _chat(server)
    assert (text, entries) == (want_text, want_entries)
    assert finishes == want_finish == {0: ["length"], 1: ["length"]}
    assert all(len(entries[k]) == 20 for k in (0, 1)) and usage.completion_tokens == 40
    assert all(merged[k] < each[k] for k in (0, 1))


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
    def build(family):
        path = make_chat_checkpoint(tmp_path_factory.mktemp(family.replace(".", "")) / "tiny", family, seed=7,
                                    std=0.3, max_position_embeddings=4096)
        llm = LLM(path, backend="cpu", **{"kv_cache.block_size": 16})
        llm.script = Script(llm)
        return llm
    return build


def test_tool_calls_and_reasoning_behind_their_engine(chat_llm):
    v3 = chat_llm("v3")
    calls = [("get_weather", '{"city": "Oslo", "days": 2, "unit": "C"}'), ("ping", '{"ok": true}')]
    answer = "Checking both." + V3.render(calls)
    with _serve(v3, 3) as server:
        v3.script.next(answer)
        _, content, got, finish = streamed(_client(server).chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200, stream=True))
    assert finish == "tool_calls" and content == "Checking both."
    assert [(g["name"], g["arguments"]) for g in got.values()] == calls
    r1 = chat_llm("r1")
    with _serve(r1, 3) as server:
        r1.script.next("\nThe user greets me.\n</think>\n\nHello!")
        reasoning, content, _, finish = streamed(_client(server).chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=100, stream=True))
    assert (reasoning, content, finish) == ("\nThe user greets me.\n", "\n\nHello!", "stop")
