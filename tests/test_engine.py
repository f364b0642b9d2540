"""Engine behaviour: stop strings, EOS, max tokens, sampling controls, streaming, batching."""
import json
import random

import pytest
import torch

from dsv3 import LLM
from dsv3.core.errors import RequestError
from dsv3.core.sampling import SamplingParams, target_probs

from helpers import make_checkpoint, tiny_config


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("m") / "tiny", tiny_config(), seed=11, std=0.3)
    return LLM(path, backend="cpu")


def test_stop_string_cuts_output(llm):
    full = llm.generate(["hello world"], max_new_tokens=24)[0]
    assert len(full) > 6
    stop = full[3:6]
    cut = llm.generate(["hello world"], max_new_tokens=24, stop=[stop])[0]
    assert cut == full[: full.find(stop)]


def test_streamed_deltas_add_up_to_the_text(llm):
    pieces = {0: [], 1: []}
    texts = llm.generate(["hello", "def add(a, b):"], max_new_tokens=12, temperature=0.9, seed=5,
                         on_output=lambda i, out: pieces[i].append(out.delta))
    assert ["".join(pieces[i]) for i in range(2)] == texts


def test_eos_stops_and_max_tokens_bounds(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", tiny_config(), seed=11, std=0.3)
    llm = LLM(path, backend="cpu")
    ids = llm.tokenizer.encode("hello world")
    outs, _ = llm.generate_ids([ids], max_new_tokens=5)
    assert len(outs[0]) == 5
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "eos_token_id": outs[0][2]}))
    outs2, _ = LLM(path, backend="cpu").generate_ids([ids], max_new_tokens=5)
    assert outs2[0] == outs[0][:2]   # stops at EOS, which is not part of the output


def test_sampling_controls(llm):
    ids = [llm.tokenizer.encode(p) for p in ("hello world", "Beautiful")]
    greedy, _ = llm.generate_ids(ids, max_new_tokens=8)
    assert llm.generate_ids(ids, max_new_tokens=8, temperature=1.5, top_k=1, seed=1)[0] == greedy
    assert llm.generate_ids(ids, max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=2)[0] == greedy
    a = llm.generate_ids(ids, max_new_tokens=8, temperature=1.5, seed=3)[0]
    assert llm.generate_ids(ids, max_new_tokens=8, temperature=1.5, seed=3)[0] == a
    assert llm.generate_ids(ids, max_new_tokens=8, temperature=1.5, seed=4)[0] != a


def test_batch_equals_one_by_one(llm):
    prompts = ["hello world", "def add(a, b):\n    return", "B", "ugly " * 30]
    together = llm.generate(prompts, max_new_tokens=10)
    assert together == [llm.generate([p], max_new_tokens=10)[0] for p in prompts]


def test_target_probs_filters():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(random.randrange(2**31)))
    p = target_probs(logits, SamplingParams(temperature=0.7, top_k=5))
    assert (p > 0).sum() == 5 and torch.isclose(p.sum(), torch.tensor(1.0))
    q = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    kept = q > 0
    ref = logits.softmax(-1)
    assert ref[kept].sum() >= 0.5 and ref[kept].sum() - ref[kept].min() < 0.5   # smallest prefix reaching 0.5


def test_bad_sampling_values_are_clear():
    for kwargs, key in (({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                        ({"max_new_tokens": 0}, "max_new_tokens"), ({"top_k": -2}, "top_k")):
        with pytest.raises(RequestError, match=key):
            SamplingParams(**kwargs)


def test_warm_up_leaves_nothing_behind(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", tiny_config(), seed=12, std=0.3)
    cold = LLM(path, backend="cpu")
    prompts = [cold.tokenizer.encode(p) for p in ("hello world", "def add(a, b):", "ugly " * 20)]
    expected, _ = cold.generate_ids(prompts, max_new_tokens=10)
    warm = LLM(path, backend="cpu")
    engine = warm.engine
    engine.max_batch_tokens = 300
    steps = engine.warm_up(max_batch=8)
    # decode batches of 1, 2, 4, 8 (a prefill and 4 decode steps each), lone prefills of 16, 17, ..., 256, 257 tokens
    assert steps == 4 * 5 + 10
    assert not engine.has_work()
    assert engine.cache.allocator.num_used == 0 and engine.cache.allocator.num_registered == 0
    assert engine.prefix_caching and engine.stats.steps == 0
    assert warm.generate_ids(prompts, max_new_tokens=10)[0] == expected
