"""Absorbed (cached decode) attention equals naive attention and full recompute."""
import random

import pytest
import torch

from dsv3 import LLM
from dsv3.core.batch import Chunk
from dsv3.core.cache import LatentCache

from helpers import check_decode_beside_chunked_prefill, make_checkpoint, random_prompts, rel_err, run_chunks, tiny_config


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
            "mscale_all_dim": 1.0}
    path, _ = make_checkpoint(tmp_path_factory.mktemp("c") / "ckpt", tiny_config(rope_scaling=yarn),
                              seed=random.randrange(2**31))
    return LLM(path, backend="cpu", dtype="float32", **{"kv_cache.block_size": 4})


def _fresh_cache(llm, blocks=64):
    return LatentCache(llm.model.num_cache_layers, blocks, llm.cache.block_size, llm.config.latent_dim,
                       torch.float32, "cpu")


def test_cached_decode_equals_full_recompute(llm):
    """Prefill two ragged prompts, then decode token by token (absorbed path, mixed in one batch with a
    third sequence's chunked prefill); every step's logits match recomputing the whole sequence."""
    seqs = random_prompts(llm.config.vocab_size, [9, 3, 30], random.randrange(2**31))
    cache = _fresh_cache(llm)
    blocks = [list(range(0, 16)), list(range(16, 32)), list(range(32, 48))]
    check_decode_beside_chunked_prefill(llm, cache, seqs, blocks, steps=6, chunk=5)   # sequence 3: 5 at a time


def test_absorbed_equals_naive_for_multi_token_chunks(llm):
    """The same multi-token chunk after a cached prefix, once through absorbed attention (as speculative
    verification uses it) and once through naive attention over the gathered cache."""
    prefix, tail = random_prompts(llm.config.vocab_size, [11, 4], random.randrange(2**31))
    results = []
    for decode in (True, False):
        cache = _fresh_cache(llm)
        run_chunks(llm, cache, [Chunk(prefix, 0, list(range(8)))])
        results.append(run_chunks(llm, cache, [Chunk(tail, len(prefix), list(range(8)), decode=decode)])[0])
    assert rel_err(results[0], results[1]) < 1e-4
    assert rel_err(results[1], llm.logits([prefix + tail])[0, -len(tail):]) < 1e-4


def test_generate_matches_stepwise_greedy(llm):
    """The engine's greedy generation equals argmax over full recomputation at every step."""
    prompts = random_prompts(llm.config.vocab_size, [6, 13], random.randrange(2**31))
    outs, _ = llm.generate_ids(prompts, max_new_tokens=8, ignore_eos=True)
    for prompt, out in zip(prompts, outs):
        seq = list(prompt)
        for tok in out:
            assert tok == int(llm.logits([seq])[0, -1].argmax())
            seq.append(tok)
    assert llm.cache.allocator.num_free == llm.cache.num_blocks  # every block returned
