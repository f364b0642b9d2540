"""Prefix caching, admission control and preemption in the engine.

Shared prompt blocks are taken read-only (reference counts), and a request produces exactly the
tokens it produces without sharing, with and without MTP speculation; the MTP layer's cached slots
of a shared block are what a fresh pass over the new sequence computes.
"""
import random

import pytest
import torch

from dsv3 import LLM
from dsv3.core.batch import Batch, Chunk
from dsv3.core.cache import BlockAllocator, LatentCache
from dsv3.core.engine import QueueFullError
from dsv3.core.errors import RequestError
from dsv3.core.sampling import SamplingParams

from helpers import make_checkpoint, random_prompts, tiny_config

BS = 8   # small blocks, so short prompts span several


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("p") / "tiny", tiny_config(vocab_size=96), seed=5, std=0.3)
    return path


def _llm(ckpt, k=0, sharing=True, **overrides):
    spec = {"speculative.method": "mtp", "speculative.num_draft_tokens": k} if k else {}
    llm = LLM(ckpt, backend="cpu", **{"kv_cache.block_size": BS, **spec, **overrides})
    llm.engine.prefix_caching = sharing
    return llm


def _greedy(n=12):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def _shared_prompts(seed, prefix_len=21, suffix_lens=(3, 7, 1, 12)):
    prefix = random_prompts(96, [prefix_len], seed)[0]
    return [prefix + s for s in random_prompts(96, list(suffix_lens), seed + 1)]


def _expected(ckpt, prompts, k=0, n=12):
    """Each prompt alone in a fresh engine without prefix caching: the tokens to reproduce."""
    plain = _llm(ckpt, k=k, sharing=False)
    return [plain.generate_ids([p], max_new_tokens=n, ignore_eos=True)[0][0] for p in prompts]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_shared_prefix_reuses_blocks_and_tokens_are_unchanged(ckpt, k):
    seed = random.randrange(2**31)
    prompts = _shared_prompts(seed)
    want = _expected(ckpt, prompts, k)
    llm = _llm(ckpt, k=k)
    eng, alloc = llm.engine, llm.cache.allocator
    first = eng.add(prompts[0], _greedy())
    eng.step()                                    # the whole first prompt: its full blocks are registered
    shared_blocks = list(first.blocks[:2])        # 21 shared tokens = 2 full blocks of 8
    rest = [eng.add(p, _greedy()) for p in prompts[1:]]
    eng.step()
    for s in rest:
        # the last prompt token is always computed, so a 22-token prompt shares only 2 blocks too
        assert s.blocks[:2] == shared_blocks and s.num_prefix_cached == 16, f"seed={seed}"
    assert [alloc.refcount(b) for b in shared_blocks] == [len(prompts)] * 2
    assert eng.stats.prefix_cached_tokens == 16 * len(rest)
    eng.run_to_completion()
    assert [s.output_ids for s in [first] + rest] == want, f"k={k} seed={seed}"
    assert alloc.num_free == llm.cache.num_blocks
    # finished requests leave their blocks findable: the same prompt again computes only its tail
    again, _ = llm.generate_ids(prompts[:1], max_new_tokens=12, ignore_eos=True)
    assert again[0] == want[0] and eng.stats.prefix_cached_tokens == 16 * len(prompts)


def test_mtp_cache_of_shared_blocks_matches_a_fresh_pass(ckpt):
    """The MTP layer's slot i reads token i + 1: a shared block's MTP slots hold what the new sequence
    itself would compute, and a prompt that differs only right after a block does not share it."""
    seed = random.randrange(2**31)
    llm = _llm(ckpt, k=2)
    eng = llm.engine
    base = random_prompts(96, [30], seed)[0]
    eng.add(base, _greedy(4))
    eng.run_to_completion()
    b = eng.add(base[:25] + random_prompts(96, [5], seed + 1)[0], _greedy(5))
    differ = base[:16] + [(base[16] + 1) % 96] + base[17:24]   # block 1 equal, the token after it not
    c = eng.add(differ, _greedy(1))
    eng.step()
    assert b.num_prefix_cached == 24 and c.num_prefix_cached == 8, f"seed={seed}"
    # a fresh cache: main layers over b's first 24 tokens, the MTP layer over slots 0..23 with the
    # true hidden states and tokens 1..24
    cache = LatentCache(llm.model.num_cache_layers, 8, BS, llm.config.latent_dim, torch.float32, "cpu")
    blocks = cache.allocator.allocate(4)
    with torch.inference_mode():
        m = Batch.build([Chunk(b.token_ids[:24], 0, blocks)], BS, "cpu")
        hidden = llm.model(m, cache.layers)
        t = Batch.build([Chunk(b.token_ids[1:25], 0, blocks)], BS, "cpu")
        llm.model.mtp_hidden(t.input_ids, hidden, t, cache.layers)
    for layer in range(llm.model.num_cache_layers):
        ours = llm.cache.layers[layer][b.blocks[:3]]
        theirs = cache.layers[layer][blocks[:3]]
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5), f"cache layer {layer} seed={seed}"


def test_without_mtp_a_block_is_shared_regardless_of_the_next_token(ckpt):
    llm = _llm(ckpt)
    base = random_prompts(96, [20], random.randrange(2**31))[0]
    llm.generate_ids([base], max_new_tokens=2)
    s = llm.engine.add(base[:8] + [(base[8] + 1) % 96] + base[9:], _greedy(1))
    llm.engine.step()
    assert s.num_prefix_cached == 8
    llm.engine.run_to_completion()


def test_preemption_under_a_full_cache_keeps_outputs_and_frees_everything(ckpt):
    """A cache of 12 blocks for 6 sequences that need 3 to 5 each: admission queues some, growth
    preempts others, and every sequence still produces its solo tokens."""
    seed = random.randrange(2**31)
    prompts = random_prompts(96, [9, 17, 4, 23, 12, 6], seed)
    want = _expected(ckpt, prompts, n=14)
    llm = _llm(ckpt, **{"kv_cache.max_tokens": 12 * BS})
    got, _ = llm.generate_ids(prompts, max_new_tokens=14, ignore_eos=True)
    assert got == want, f"seed={seed}"
    assert llm.engine.stats.preemptions > 0
    assert llm.cache.allocator.num_free == llm.cache.num_blocks


def test_preemption_with_speculation(ckpt):
    seed = random.randrange(2**31)
    prompts = random_prompts(96, [9, 17, 4, 23], seed)
    want = _expected(ckpt, prompts, k=2, n=14)
    llm = _llm(ckpt, k=2, **{"kv_cache.max_tokens": 12 * BS})
    got, _ = llm.generate_ids(prompts, max_new_tokens=14, ignore_eos=True)
    assert got == want and llm.engine.stats.preemptions > 0, f"seed={seed}"
    assert llm.cache.allocator.num_free == llm.cache.num_blocks


def test_a_sequence_that_outgrows_the_whole_cache_ends_with_length(ckpt):
    llm = _llm(ckpt, **{"kv_cache.max_tokens": 4 * BS})
    outs, _ = llm.generate_ids(random_prompts(96, [10], 1), max_new_tokens=100, ignore_eos=True)
    # every one of the 32 slots filled; the token sampled last needs none, then finish_reason "length"
    assert len(outs[0]) == 4 * BS - 10 + 1
    assert llm.cache.allocator.num_free == llm.cache.num_blocks


def test_admission_bounds(ckpt):
    llm = _llm(ckpt, **{"kv_cache.max_tokens": 4 * BS})
    eng = llm.engine
    with pytest.raises(RequestError, match="kv_cache.max_tokens"):
        eng.add(list(range(2, 34)), _greedy())           # 32 tokens + 1 does not fit 4 blocks of 8
    eng.max_waiting = 2
    seqs = [eng.add([5, 6, 7], _greedy()) for _ in range(2)]
    with pytest.raises(QueueFullError, match="max_waiting"):
        eng.add([5, 6, 7], _greedy())
    eng.release(seqs[0])                                 # a waiting sequence can be dropped too
    eng.add([5, 6, 7], _greedy())
    eng.run_to_completion()
    assert not eng.waiting and not eng.running


def test_allocator_refcounts_and_eviction():
    alloc = BlockAllocator(4)
    a = alloc.allocate(3)
    alloc.register(a[0], b"k0")
    alloc.register(a[1], b"k1")
    alloc.share(a[0])
    alloc.free(a)
    assert alloc.refcount(a[0]) == 1 and alloc.num_free == 3 and alloc.num_used == 1
    assert alloc.lookup(b"k1") == a[1]                   # freed but still findable (evictable)
    fresh = alloc.allocate(2)                            # blank blocks go first ...
    assert a[1] not in fresh and alloc.lookup(b"k1") == a[1]
    alloc.allocate(1)                                    # ... then the evictable one is reused
    assert alloc.lookup(b"k1") is None and alloc.num_free == 0
    with pytest.raises(RequestError, match="cache is full"):
        alloc.allocate(1)
