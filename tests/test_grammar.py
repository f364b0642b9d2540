"""Structured output (dsv3/core/grammar.py): schemas xgrammar refuses are RequestErrors naming the
problem; random walks through the grammar (random logits, sampled at temperature 1, fresh seeds)
always end in JSON that `jsonschema` validates; the batched bitmask masks exactly the disallowed
tokens of the constrained rows and nothing else, and costs nothing without them; through the engine,
constrained rows are valid, unconstrained rows in the same batch are unchanged, and a speculative
engine gives grammar rows no drafts."""
import json
import random

import pytest
import torch

jsonschema = pytest.importorskip("jsonschema", reason="needs the test extra: pip install -e '.[test]'")

from dsv3 import LLM  # noqa: E402
from dsv3.core import grammar as G  # noqa: E402
from dsv3.core.errors import RequestError  # noqa: E402
from dsv3.core.sampling import SamplingParams  # noqa: E402
from dsv3.core.tokenizer import Tokenizer  # noqa: E402
from dsv3.serve.tool_parsers import V3, V3_1, ToolCallParser, collect  # noqa: E402

from helpers import make_chat_checkpoint, make_checkpoint  # noqa: E402

VOCAB = 512          # the tiny model's vocabulary (the tokenizer's is smaller: ids past it are never allowed)
EOS = 1

# Every kind of value, each bounded (maxLength, maxItems, integer ranges, enums), so that a walk that
# follows the grammar must end within MAX_STEPS tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "count": {"type": "integer", "minimum": -5, "maximum": 300},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3},
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                    "y": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}},
                  "required": ["x", "y"], "additionalProperties": False},
        "code": {"type": "string", "pattern": "^[a-f0-9]{2,4}$"},
    },
    "required": ["name", "count", "ok", "color", "tags", "point"],
    "additionalProperties": False,
}
MAX_STEPS = 400


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(make_chat_checkpoint(tmp_path_factory.mktemp("g") / "tiny", "v3"))


@pytest.fixture(scope="module")
def compiler(tok):
    return G.compiler_for(tok, VOCAB, (EOS,))


def walk(compiler, spec, rng: torch.Generator, steps=MAX_STEPS) -> tuple[list[int], bool]:
    """Sample through the grammar from random logits at temperature 1: (tokens before EOS, ended)."""
    m = compiler.matcher(spec)
    out = []
    for _ in range(steps):
        logits = torch.randn(1, VOCAB, generator=rng) * 3
        G.apply_bitmask(logits, [m])
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=rng))
        if token == EOS:
            return out, True
        assert m.accept(token), token
        out.append(token)
    return out, False


@pytest.mark.parametrize("schema, problem", [
    ({"type": "foo"}, 'Unsupported type "foo"'),
    ({"type": "string", "maxLength": "x"}, "maxLength must be an integer"),
    ({"enum": []}, "enum array must not be empty"),
    ({"type": "integer", "minimum": 5, "maximum": 3}, "minimum greater than maximum"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "string", "pattern": "(("}, "parenthesis is not closed"),
    ('{"type": ', "not valid JSON"),
    ([1, 2], "must be a JSON object"),
])
def test_schemas_xgrammar_refuses_are_request_errors_naming_the_problem(schema, problem):
    with pytest.raises(RequestError) as e:
        G.json_schema(schema)
    assert problem in str(e.value)
    assert ".cc:" not in str(e.value)           # no C++ source location in what a user reads


def test_random_walks_through_a_schema_always_give_valid_json(tok, compiler):
    spec = G.json_schema(SCHEMA)
    seed = random.randrange(2**31)                # fresh every run; printed on failure
    rng = torch.Generator().manual_seed(seed)
    for _ in range(40):
        out, ended = walk(compiler, spec, rng)
        text = tok.decode(out)
        assert ended, (seed, text)
        value = json.loads(text)                  # strict: raw control characters in strings are refused
        jsonschema.validate(value, SCHEMA)
        assert "\ufffd" not in text                # every byte sequence was UTF-8


def test_strings_are_json_and_utf8(tok, compiler):
    """Two holes in xgrammar 0.2.9's string grammars, closed in grammar.py: length-bounded strings
    took raw control characters, and all strings took UTF-8-encoded surrogates (which decode to three
    replacement characters each, so the string came back longer than maxLength)."""
    schema = {"type": "object", "properties": {"short": {"type": "string", "maxLength": 12},
                                               "free": {"type": "string"}}, "required": ["short", "free"]}
    spec = G.json_schema(schema)
    seed = random.randrange(2**31)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(60):
        out, ended = walk(compiler, spec, rng, steps=150)
        if not ended:                             # the free string may run long
            continue
        text = tok.decode(out)
        assert "\ufffd" not in text, (seed, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_walks_give_objects(tok, compiler):
    seed = random.randrange(2**31)
    rng = torch.Generator().manual_seed(seed)
    ended_any = False
    for _ in range(20):
        out, ended = walk(compiler, G.json_object(), rng, steps=60)
        if ended:                                  # free keys and strings may run past 60 tokens
            ended_any = True
            assert isinstance(json.loads(tok.decode(out)), dict), (seed, tok.decode(out))
        else:
            assert tok.decode(out).lstrip().startswith("{"), seed
    assert ended_any, seed


@pytest.mark.parametrize("fmt", [V3, V3_1])
@pytest.mark.parametrize("parallel", [False, True])
def test_tool_call_grammar_gives_calls_whose_arguments_validate(tok, compiler, fmt, parallel):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
                 "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                 "required": ["city", "days"]}}},
             {"type": "function", "function": {"name": "ping", "parameters": {
                 "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    spec = fmt.grammar(tools, parallel)
    seed = random.randrange(2**31)
    rng = torch.Generator().manual_seed(seed)
    counts = set()
    for _ in range(12):
        out, ended = walk(compiler, spec, rng, steps=3000)     # parallel: a geometric number of calls
        assert ended, seed
        parser = ToolCallParser(fmt)
        events = parser.feed(tok.backend.decode(out, skip_special_tokens=False)) + parser.finish()
        content, calls = collect(parser, events)
        assert content == "" and calls, (seed, content)
        for c in calls:
            jsonschema.validate(json.loads(c.arguments), schemas[c.name])
        counts.add(len(calls))
    assert counts == {1} if not parallel else max(counts) >= 1


def test_bitmask_masks_exactly_the_disallowed_tokens_of_constrained_rows(compiler):
    spec = G.json_schema(SCHEMA)
    grammars = [None, compiler.matcher(spec), None, compiler.matcher(spec.after(7))]   # row 3 waits for token 7
    logits = torch.randn(4, VOCAB)
    before = logits.clone()
    G.apply_bitmask(logits, grammars)
    assert torch.equal(logits[[0, 2, 3]], before[[0, 2, 3]])              # free rows, and the waiting one
    allowed = torch.isfinite(logits[1])
    assert torch.equal(logits[1][allowed], before[1][allowed])
    expected = torch.zeros(VOCAB, dtype=torch.bool)
    bitmask = torch.full((1, (VOCAB + 31) // 32), -1, dtype=torch.int32)
    grammars[1].fill_row(bitmask, 0)
    for i in range(VOCAB):
        expected[i] = bool((int(bitmask[0, i // 32]) >> (i % 32)) & 1)
    assert torch.equal(allowed, expected) and 0 < int(allowed.sum()) < VOCAB
    assert grammars[3].accept(7) and grammars[3].constraining     # after its token, row 3 is constrained


def test_no_constrained_row_allocates_nothing(monkeypatch, compiler):
    import xgrammar
    monkeypatch.setattr(xgrammar, "allocate_token_bitmask", lambda *a, **k: pytest.fail("allocated a bitmask"))
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    G.apply_bitmask(logits, [None, None, compiler.matcher(G.json_object().after(9))])
    assert torch.equal(logits, before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("e") / "tiny", seed=3, std=0.3)
    return path


def test_engine_constrains_its_rows_and_leaves_the_others_alone(ckpt, one_thread):
    llm = LLM(ckpt, backend="cpu")
    spec = G.json_schema(SCHEMA)
    prompts = [llm.tokenizer.encode(p) for p in ("def add(a, b):", "hello world", "Beautiful", "return")]
    seed = random.randrange(2**31)
    free = dict(max_new_tokens=24, temperature=1.0)
    alone = [llm.generate_ids([p], seed=seed + i, **free)[1][0] for i, p in enumerate(prompts)]
    # the same free requests batched with constrained ones (interleaved), same seeds
    seqs = []
    for i, p in enumerate(prompts):
        seqs.append(llm.engine.add(p, SamplingParams(seed=seed + i, **free)))
        seqs.append(llm.engine.add(p, SamplingParams(seed=seed + 100 + i, grammar=spec, max_new_tokens=MAX_STEPS,
                                                     temperature=1.0)))
    llm.engine.run_to_completion()
    for i, s in enumerate(seqs):
        if i % 2 == 0:
            assert s.output_ids == alone[i // 2].token_ids, seed
        else:
            assert s.finish_reason == "stop", (seed, s.text)
            jsonschema.validate(json.loads(s.text), SCHEMA)


def test_speculative_engine_gives_grammar_rows_no_drafts(ckpt, one_thread):
    llm = LLM(ckpt, backend="cpu", **{"speculative.method": "mtp", "speculative.num_draft_tokens": 2})
    spec = G.json_schema(SCHEMA)
    seed = random.randrange(2**31)
    prompt = llm.tokenizer.encode("def add(a, b):")
    constrained = llm.engine.add(prompt, SamplingParams(seed=seed, grammar=spec, max_new_tokens=MAX_STEPS,
                                                        temperature=1.0))
    free = llm.engine.add(prompt, SamplingParams(seed=seed, max_new_tokens=32, temperature=1.0))
    drafted = set()
    while llm.engine.has_work():
        llm.engine.step()
        drafted |= {s.id for s in (constrained, free) if s.drafts}
    assert drafted == {free.id}
    assert constrained.finish_reason == "stop", (seed, constrained.text)
    jsonschema.validate(json.loads(constrained.text), SCHEMA)


def test_grammar_after_reasoning_starts_at_its_token(ckpt, one_thread):
    """A spec with after_token leaves the output free until that token, then constrains the rest."""
    llm = LLM(ckpt, backend="cpu")
    prompt = llm.tokenizer.encode("hello world")
    first = llm.generate_ids([prompt], max_new_tokens=6)[0][0]          # greedy, free
    marker = first[3]                                                   # a token the free output writes 4th
    spec = G.json_schema(SCHEMA).after(marker)
    out, text = llm.generate_ids([prompt], grammar=spec, max_new_tokens=MAX_STEPS, temperature=0.0)
    cut = out[0].index(marker) + 1
    assert out[0][:cut] == first[: first.index(marker) + 1]            # free (greedy) up to the marker
    jsonschema.validate(json.loads(llm.tokenizer.decode(out[0][cut:])), SCHEMA)
    assert text[0].finish_reason == "stop"


def test_engine_without_a_tokenizer_refuses_a_grammar(ckpt):
    llm = LLM(ckpt, backend="cpu")
    llm.engine.tokenizer = None
    with pytest.raises(RequestError, match="needs the checkpoint's tokenizer"):
        llm.engine.add([2, 3], SamplingParams(grammar=G.json_object()))


def test_min_tokens_and_a_grammar_are_refused_together():
    """A complete grammar allows only EOS, which min_tokens masks: the row would have no token left."""
    with pytest.raises(RequestError, match="min_tokens .*cannot be combined with structured output"):
        SamplingParams(min_tokens=3, grammar=G.json_object())


def test_a_new_grammar_compiles_off_the_engine_thread(ckpt, monkeypatch, one_thread):
    """Engine.add parses the spec and returns while it compiles; the row waits for it at its first
    constrained token, and is valid."""
    import threading
    import time
    llm = LLM(ckpt, backend="cpu")
    gate, original = threading.Event(), G.GrammarCompiler._compile

    def held(self, parsed):
        assert gate.wait(30)
        return original(self, parsed)
    monkeypatch.setattr(G.GrammarCompiler, "_compile", held)
    schema = dict(SCHEMA, title=f"fresh {random.random()}")          # a spec no earlier test compiled
    began = time.monotonic()
    seq = llm.engine.add(llm.tokenizer.encode("hello"), SamplingParams(grammar=G.json_schema(schema),
                                                                       max_new_tokens=MAX_STEPS, temperature=1.0))
    assert time.monotonic() - began < 5                               # not held by the compile
    with pytest.raises(RequestError, match='Unsupported type "foo"'):  # parsing is still at add()
        llm.engine.add([2, 3], SamplingParams(grammar=G.GrammarSpec("json_schema", '{"type": "foo"}')))
    threading.Timer(0.3, gate.set).start()
    llm.engine.run_to_completion()
    assert seq.finish_reason == "stop"
    jsonschema.validate(json.loads(seq.text), SCHEMA)
