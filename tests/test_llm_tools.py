"""Structured output, tool calls and reasoning from the Python API (LLM.generate / LLM.chat) and the
CLI (--json-schema FILE), on tiny checkpoints with the V3 and V3.1 templates."""
import json
import random

import pytest

jsonschema = pytest.importorskip("jsonschema", reason="needs the test extra: pip install -e '.[test]'")

from dsv3 import LLM  # noqa: E402
from dsv3.commands.main import main  # noqa: E402
from dsv3.core.errors import RequestError  # noqa: E402
from dsv3.serve.chat import plan  # noqa: E402
from dsv3.serve.tool_parsers import V3, V3_1  # noqa: E402

from helpers import make_chat_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "n", "ok"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Oslo", "Paris"]}, "days": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 7}},
    "required": ["city", "days"]}}}]
ASK = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    path = make_chat_checkpoint(tmp_path_factory.mktemp("v3") / "tiny", "v3", seed=5, std=0.3,
                                max_position_embeddings=4096)
    return LLM(path, backend="cpu")


@pytest.fixture(scope="module")
def v31(tmp_path_factory):
    path = make_chat_checkpoint(tmp_path_factory.mktemp("v31") / "tiny", "v3.1", seed=5, std=0.3,
                                max_position_embeddings=4096)
    return LLM(path, backend="cpu")


def test_generate_with_a_json_schema(v3):
    seed = random.randrange(2**31)
    outs = v3.generate(["A person:", "def f():"], json_schema=SCHEMA, temperature=1.0, seed=seed, max_new_tokens=200)
    for out in outs:
        assert out.finish_reason == "stop", (seed, out)
        jsonschema.validate(json.loads(out), SCHEMA)
    same = v3.generate("A person:", response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
                       temperature=1.0, seed=seed, max_new_tokens=200)
    assert same == outs[0]                              # the two spellings are one grammar
    with pytest.raises(RequestError, match='Unsupported type "foo"'):
        v3.generate("x", json_schema={"type": "foo"})
    with pytest.raises(RequestError, match="not both"):
        v3.generate("x", json_schema=SCHEMA, response_format={"type": "json_object"})


@pytest.mark.parametrize("family", ["v3", "v31"])
def test_chat_forced_tool_call(request, family):
    llm = request.getfixturevalue(family)
    seed = random.randrange(2**31)
    reply = llm.chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                     temperature=1.0, seed=seed, max_new_tokens=200)
    assert reply.finish_reason == "tool_calls" and reply["content"] is None, (seed, reply)
    [call] = reply["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), TOOLS[0]["function"]["parameters"])
    # the call and its result go back into the history (arguments as a dict are written as JSON)
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    chat = plan(llm.tokenizer, history, TOOLS)
    text, ids = llm.tokenizer.chat_prompt(chat.messages, chat.tools)
    fmt = {"v3": V3, "v31": V3_1}[family]
    assert fmt.call_begin("get_weather") + '{"city": "Oslo"}' + fmt.call_end in text
    assert "sunny" in text


def test_chat_json_schema_and_choices(v31):
    seed = random.randrange(2**31)
    replies = v31.chat(ASK, json_schema=SCHEMA, temperature=1.0, seed=seed, max_new_tokens=200, n=3)
    assert len(replies) == 3
    for r in replies:
        assert r.finish_reason == "stop", (seed, r)
        jsonschema.validate(json.loads(r["content"]), SCHEMA)
    with pytest.raises(RequestError, match="tool_choice needs tools"):
        v31.chat(ASK, tool_choice="required")
    with pytest.raises(RequestError, match="give one of them"):
        v31.chat(ASK, tools=TOOLS, tool_choice="required", json_schema=SCHEMA)
    with pytest.raises(RequestError, match=r"tools\[0\]: expected"):
        v31.chat(ASK, tools=[{"name": "get_weather"}])


def test_chat_reasoning_field_only_for_thinking(v31):
    assert "reasoning_content" not in v31.chat(ASK, max_new_tokens=4)
    thinking = v31.chat(ASK, max_new_tokens=4, template_kwargs={"thinking": True})
    assert "reasoning_content" in thinking and "<think>" not in (thinking["reasoning_content"] or "")


def test_cli_json_schema(v3, tmp_path, capsys):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    seed = str(random.randrange(2**31))
    assert main(["--model", str(v3.path), "--prompt", "", "--json-schema", str(schema_file), "--temperature", "1",
                 "--seed", seed, "--max-new-tokens", "200"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMA)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert main(["--model", str(v3.path), "--input-file", str(prompts), "--json-schema", str(schema_file),
                 "--temperature", "1", "--seed", seed, "--max-new-tokens", "200"]) == 0
    for line in capsys.readouterr().out.splitlines():
        record = json.loads(line)
        assert record["finish_reason"] == "stop"
        jsonschema.validate(json.loads(record["completion"]), SCHEMA)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "foo"}')
    assert main(["--model", str(v3.path), "--prompt", "x", "--json-schema", str(bad)]) == 2
    assert 'Unsupported type "foo"' in capsys.readouterr().err


def test_tools_need_markers_that_decoding_keeps(tmp_path):
    """A tokenizer that flags the tool-call markers special drops them when decoding: tools are refused,
    not silently answered as content."""
    from helpers import make_checkpoint
    path, _ = make_checkpoint(tmp_path / "special")        # the default fixture: every marker special
    llm = LLM(path, backend="cpu")
    with pytest.raises(RequestError, match="flags the tool-call markers special"):
        llm.chat(ASK, tools=TOOLS)
