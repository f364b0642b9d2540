"""Tools, structured output and reasoning through `dsv3-run serve`, driven by the official `openai`
client, on tiny checkpoints whose tokenizers carry the V3, R1 and V3.1 templates.

Structured output is checked on the random model itself (sampled at temperature 1, fresh seeds: the
grammar alone must make it valid). Parsing is checked on answers the test chooses: a script makes
the engine emit fixed tokens for a request (after the model ran, before post-processing), so the
text goes through detokenization, the HTTP stream and the client token by token like any answer.
"""
import asyncio
import json
import random

import pytest

openai = pytest.importorskip("openai", reason="needs the test extra: pip install -e '.[test]'")
jsonschema = pytest.importorskip("jsonschema", reason="needs the test extra: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install -e '.[serve]'")

from dsv3 import LLM  # noqa: E402
from dsv3.core.tokenizer import Tokenizer  # noqa: E402
from dsv3.serve import chat as chat_requests  # noqa: E402
from dsv3.serve import protocol as P  # noqa: E402
from dsv3.serve.app import ServedModel, ServeOptions  # noqa: E402
from dsv3.serve.engine_process import EngineProcess  # noqa: E402
from dsv3.serve.server import ServerThread  # noqa: E402
from dsv3.serve.tool_parsers import V3, V3_1  # noqa: E402

from helpers import make_chat_checkpoint  # noqa: E402

MODEL = "tiny"
pytestmark = pytest.mark.usefixtures("one_thread")
ASK = [{"role": "user", "content": "hello world"}]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
                   "vip": {"type": "boolean"}},
    "required": ["name", "age", "pets", "vip"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 14},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "days", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "ping", "parameters": {
             "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Script:
    """The next request's answer starts with fixed tokens: the runner's sampled token is replaced by
    the script's while it lasts (the model still runs, its cache stays consistent), then the model
    goes on by itself (under the request's grammar, if it has one)."""

    def __init__(self, llm):
        self.llm, self.queue, self.scripts = llm, [], {}
        runner = llm.engine.runner
        original = runner.run

        def run(plan):
            result = original(plan)
            for i, (s, _) in enumerate(result.plan):
                if s.id not in self.scripts and self.queue and not s.output_ids:    # a new request
                    self.scripts[s.id] = self.queue.pop(0)
                script = self.scripts.get(s.id)
                if result.tokens[i] and script is not None and len(s.output_ids) < len(script):
                    result.tokens[i] = [script[len(s.output_ids)]]
            return result
        runner.run = run

    def next(self, text: str, eos: bool = True) -> None:
        tok = self.llm.tokenizer
        self.queue.append(tok.encode(text, add_bos=False) + ([tok.eos_id] if eos else []))


def serve(tmp_path_factory, family: str):
    # a longer context than the tiny default: the tools' system prompt alone is ~800 of its tokens
    path = make_chat_checkpoint(tmp_path_factory.mktemp(family.replace(".", "")) / "tiny", family, seed=7, std=0.3,
                                max_position_embeddings=4096)
    llm = LLM(path, backend="cpu", **{"kv_cache.block_size": 16})
    server = ServerThread(llm, ServeOptions(MODEL))
    server.llm, server.script = llm, Script(llm)
    return server


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    with serve(tmp_path_factory, "v3") as s:
        yield s


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    with serve(tmp_path_factory, "r1") as s:
        yield s


@pytest.fixture(scope="module")
def v31(tmp_path_factory):
    with serve(tmp_path_factory, "v3.1") as s:
        yield s


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def json_schema_format(schema=SCHEMA):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def streamed(stream):
    """(reasoning, content, {index: call}, finish_reason) assembled from chunks as a client does;
    each call's id and name must come before its arguments."""
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        d = choice.delta
        reasoning += getattr(d, "reasoning_content", None) or ""
        content += d.content or ""
        for c in d.tool_calls or []:
            if c.id is not None:
                assert c.index not in calls and c.function.name and c.type == "function"
                calls[c.index] = {"id": c.id, "name": c.function.name, "arguments": c.function.arguments or ""}
            else:
                calls[c.index]["arguments"] += c.function.arguments
        finish = choice.finish_reason or finish
    return reasoning, content, calls, finish


# -- structured output on the random model ----------------------------------------------------------
def test_json_schema_answers_validate_whatever_the_seed(v3):
    c = client(v3)
    seed = random.randrange(2**31)
    for i in range(4):
        r = c.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=seed + i, max_tokens=300,
                                      response_format=json_schema_format())
        assert r.choices[0].finish_reason == "stop", (seed, r.choices[0].message.content)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        _, content, _, finish = streamed(c.chat.completions.create(
            model=MODEL, messages=ASK, temperature=1.0, seed=seed + i, max_tokens=300, stream=True,
            response_format=json_schema_format()))
        assert finish == "stop" and content == r.choices[0].message.content, seed     # same seed, same answer


def test_json_object_answers_are_objects(v3):
    c = client(v3)
    seed = random.randrange(2**31)
    finished = 0
    for i in range(10):
        r = c.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=seed + i, max_tokens=80,
                                      response_format={"type": "json_object"})
        text = r.choices[0].message.content
        assert text.lstrip().startswith("{"), seed
        if r.choices[0].finish_reason == "stop":       # free keys and strings may run past max_tokens
            finished += 1
            assert isinstance(json.loads(text), dict), (seed, text)
    assert finished, seed


@pytest.mark.parametrize("schema, problem", [
    ({"type": "foo"}, 'Unsupported type "foo"'),
    ({"type": "integer", "minimum": 5, "maximum": 3}, "minimum greater than maximum"),
])
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_the_problem(v3, schema, problem):
    with pytest.raises(openai.BadRequestError) as e:
        client(v3).chat.completions.create(model=MODEL, messages=ASK, response_format=json_schema_format(schema))
    assert problem in e.value.message and e.value.body["param"] == "response_format"


@pytest.mark.parametrize("request_fields, problem, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs json_schema.schema",
     "response_format"),
    ({"tool_choice": "required"}, "tool_choice needs tools", "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope', which is not in",
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "give one of them",
     "response_format"),
    ({"tools": TOOLS + TOOLS[:1]}, "share a name", "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
      "tool_choice": "required"}, 'Unsupported type "foo"', "tools"),
    ({"chat_template_kwargs": {"messages": []}}, "may not set messages", "chat_template_kwargs"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 4}, "cannot be combined with structured output",
     "min_tokens"),
])
def test_requests_that_do_not_fit_are_400s(v3, request_fields, problem, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(v3).chat.completions.create(model=MODEL, messages=ASK, extra_body=request_fields)
    assert problem in e.value.message and e.value.body["param"] == param


# -- tool calls ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["v3", "v31"])
def test_a_forced_tool_call_validates(request, family):
    server = request.getfixturevalue(family)
    c = client(server)
    seed = random.randrange(2**31)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=1.0,
                                  seed=seed, max_tokens=300)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None, (seed, msg)
    [call] = msg.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    _, content, calls, finish = streamed(c.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=seed, max_tokens=300,
        stream=True))
    assert finish == "tool_calls" and content == "" and len(calls) == 1, seed
    assert (calls[0]["name"], calls[0]["arguments"]) == ("get_weather", call.function.arguments)


def test_required_tool_calls_validate(v3):
    c = client(v3)
    seed = random.randrange(2**31)
    for i, parallel in enumerate([True, False, True]):
        r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                      parallel_tool_calls=parallel, temperature=1.0, seed=seed + i, max_tokens=2000)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls, seed
        assert parallel or len(calls) == 1
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("family, fmt", [("v3", V3), ("v31", V3_1)])
def test_tool_calls_in_a_fixed_answer(request, family, fmt):
    server = request.getfixturevalue(family)
    c = client(server)
    calls = [("get_weather", '{"city": "Oslo", "days": 2, "unit": "C"}'), ("ping", '{"ok": true}')]
    answer = "Checking both." + fmt.render(calls)
    server.script.next(answer)
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Checking both."
    assert [(t.function.name, t.function.arguments) for t in msg.tool_calls] == calls
    server.script.next(answer)
    _, content, got, finish = streamed(c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                                                 max_tokens=200, stream=True))
    assert finish == "tool_calls" and content == "Checking both."
    assert [(g["name"], g["arguments"]) for g in got.values()] == calls
    # without tools, or with tool_choice "none", the same answer is plain content
    for fields in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        server.script.next(answer)
        r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, extra_body=fields)
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == answer
        assert not r.choices[0].message.tool_calls


def test_malformed_and_truncated_tool_calls_are_content(v3):
    c = client(v3)
    broken = "Sure." + "<｜tool▁calls▁begin｜>" + "not a call at all" + "<｜tool▁calls▁end｜>"
    v3.script.next(broken)
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200)
    assert r.choices[0].message.content == broken and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    v3.script.next(broken)
    _, content, calls, finish = streamed(c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                                                   max_tokens=200, stream=True))
    assert (content, calls, finish) == (broken, {}, "stop")
    # cut by max_tokens inside the arguments: content in the whole answer, finish_reason "length"
    answer = V3.render([("get_weather", '{"city": "Oslo", "days": 2, "unit": "C"}')])
    ids = v3.llm.tokenizer.encode(answer, add_bos=False)
    cut = len(v3.llm.tokenizer.encode(answer[: answer.index('"days"')], add_bos=False))
    v3.script.next(answer)
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=cut)
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == v3.llm.tokenizer.decode(ids[:cut])
    v3.script.next(answer)
    _, content, calls, finish = streamed(c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                                                   max_tokens=cut, stream=True))
    assert finish == "length" and calls[0]["name"] == "get_weather" and content == ""   # the call had started


def test_tool_history_renders_through_the_template(v3):
    history = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 20 C"}]
    req = P.parse(P.ChatRequest, json.dumps({"messages": history, "tools": TOOLS}).encode())
    tok = v3.llm.tokenizer
    plan = chat_requests.plan_request(req, tok)
    text, ids = tok.chat_prompt(plan.messages, plan.tools, plan.template_kwargs)
    assert ("<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
            '{"city": "Oslo"}\n```<｜tool▁call▁end｜>') in text
    assert "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny, 20 C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>" in text
    # V3's template does not list tools: a "## Tools" system prompt does, in the template's call format
    assert text.startswith("<｜begin▁of▁sentence｜>## Tools\nYou have access to the following tools:\n\n### get_weather")
    assert V3.call_begin("tool_call_name") + "tool_call_arguments" + V3.call_end in text
    r = client(v3).chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=4)
    assert r.usage.prompt_tokens == len(ids)


def test_tools_join_the_systems_prompt(r1):
    """R1's template keeps only the last system message: the tools are appended to it, not replaced by it."""
    messages = [{"role": "system", "content": "Be brief."}] + ASK
    req = P.parse(P.ChatRequest, json.dumps({"messages": messages, "tools": TOOLS}).encode())
    tok = r1.llm.tokenizer
    plan = chat_requests.plan_request(req, tok)
    text, _ = tok.chat_prompt(plan.messages, plan.tools, plan.template_kwargs)
    assert text.startswith("<｜begin▁of▁sentence｜>Be brief.\n\n## Tools\n")


# -- reasoning ----------------------------------------------------------------------------------------
def test_r1_reasoning_is_split_from_the_answer(r1):
    c = client(r1)
    r1.script.next("\nThe user greets me.\n</think>\n\nHello!")
    r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content) == ("\nThe user greets me.\n", "\n\nHello!")
    r1.script.next("\nThe user greets me.\n</think>\n\nHello!")
    reasoning, content, _, finish = streamed(c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100,
                                                                       stream=True))
    assert (reasoning, content, finish) == ("\nThe user greets me.\n", "\n\nHello!", "stop")
    # the random model itself rarely closes its reasoning: all of it is reasoning, never the tag
    r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=20, temperature=0)
    assert "<think>" not in (r.choices[0].message.reasoning_content or "") + (r.choices[0].message.content or "")


def test_structured_output_starts_after_the_reasoning(r1):
    c = client(r1)
    seed = random.randrange(2**31)
    r1.script.next("I should answer in JSON.</think>", eos=False)        # then the model, under the grammar
    r = c.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=seed, max_tokens=400,
                                  response_format=json_schema_format())
    msg = r.choices[0].message
    assert msg.reasoning_content == "I should answer in JSON." and r.choices[0].finish_reason == "stop", seed
    jsonschema.validate(json.loads(msg.content), SCHEMA)
    r1.script.next("A tool is needed.</think>", eos=False)
    # one call: with parallel calls allowed the random model may go on calling until max_tokens (seed 867955523
    # made two whole calls and most of a third in 400 tokens)
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0,
                                  seed=seed, max_tokens=400, parallel_tool_calls=False)
    msg = r.choices[0].message
    assert msg.reasoning_content == "A tool is needed." and r.choices[0].finish_reason == "tool_calls", seed
    assert len(msg.tool_calls) == 1, seed
    for call in msg.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_v31_thinks_only_when_asked(v31):
    c = client(v31)
    answer = "Let me see.</think>Hi."
    v31.script.next(answer)
    r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=50,
                                  extra_body={"chat_template_kwargs": {"thinking": True}})
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("Let me see.", "Hi.")
    v31.script.next(answer)
    reasoning, content, _, _ = streamed(c.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=50, stream=True, extra_body={"chat_template_kwargs": {"thinking": True}}))
    assert (reasoning, content) == ("Let me see.", "Hi.")
    v31.script.next(answer)                      # not thinking: the prompt closed the reasoning, all is answer
    r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=50)
    assert r.choices[0].message.content == answer and getattr(r.choices[0].message, "reasoning_content", None) is None


# -- the engine in its own process ------------------------------------------------------------------
def build_tiny(path: str):
    """Runs in the engine process (spawned: it imports this module by name)."""
    import torch
    torch.set_num_threads(1)
    return LLM(path, backend="cpu", **{"kv_cache.block_size": 16})


def test_grammars_cross_to_an_engine_process(tmp_path):
    path = make_chat_checkpoint(tmp_path / "tiny", "v3.1", seed=7, std=0.3, max_position_embeddings=4096)
    engine = EngineProcess(build_tiny, (str(path),), warm_up=False)
    info = engine.launch(timeout=120)
    model = ServedModel(path, Tokenizer(path), info["vocab_size"], info["max_context"], info["capacity_tokens"],
                        info["reserve"], info["backend"])
    seed = random.randrange(2**31)
    with ServerThread(None, ServeOptions(MODEL), worker=engine, model=model) as server:
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)

        async def requests():
            with pytest.raises(openai.BadRequestError, match='Unsupported type "foo"'):
                await c.chat.completions.create(model=MODEL, messages=ASK,
                                                response_format=json_schema_format({"type": "foo"}))
            return await asyncio.gather(     # concurrent: one step holds both grammars
                c.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=seed, max_tokens=300,
                                          response_format=json_schema_format()),
                c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                          temperature=1.0, seed=seed, max_tokens=2000))
        answer, called = asyncio.run(requests())
    jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMA)
    for call in called.choices[0].message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
