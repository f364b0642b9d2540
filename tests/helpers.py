"""Shared test helpers: tiny configs, checkpoints written to temp dirs, the transformers oracle."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from dsv3.core.config import ModelConfig
from dsv3.checkpoints.synthetic import TINY_CONFIG, random_weights, to_checkpoint_format, write_checkpoint, write_tokenizer

CORPUS = ["def add(a, b):\n    return a + b\n", "Beautiful is better than ugly.", "hello world " * 20]


def tiny_config(**changes) -> dict:
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg.update(changes)
    return cfg


def make_checkpoint(path, hf_config=None, seed=0, fmt="dense", num_shards=1, std=0.1, dtype=torch.float32,
                    tokenizer=True):
    """A random checkpoint on disk; returns (path, float32 checkpoint-named weights)."""
    hf_config = hf_config or tiny_config()
    weights = random_weights(ModelConfig.from_hf(hf_config), seed, std=std)
    write_checkpoint(path, hf_config, to_checkpoint_format(weights, fmt, dtype), num_shards, fmt)
    if tokenizer:
        write_tokenizer(path, hf_config["vocab_size"], CORPUS)
    return path, weights


DATA = Path(__file__).resolve().parent / "data"
# the family's chat templates as published (copies of ../shared/reference/)
CHAT_TEMPLATES = {
    "v3": lambda: json.loads((DATA / "deepseek-v3-tokenizer_config.json").read_text())["chat_template"],
    "r1": lambda: (DATA / "deepseek-r1-chat_template.jinja").read_text(),
    "v3.1": lambda: (DATA / "deepseek-v3.1-chat_template.jinja").read_text(),
}


def make_chat_checkpoint(path, family: str, seed=0, std=0.1, corpus=None, **config_changes):
    """A random checkpoint whose tokenizer carries `family`'s chat template ("v3", "r1", "v3.1") and
    DeepSeek's markers as the released tokenizers have them (tool-call and reasoning markers, not
    special, so they stay in decoded text); returns the path."""
    hf_config = tiny_config(**config_changes)
    weights = random_weights(ModelConfig.from_hf(hf_config), seed, std=std)
    write_checkpoint(path, hf_config, to_checkpoint_format(weights, "dense", torch.float32))
    write_tokenizer(path, hf_config["vocab_size"], corpus or CORPUS, chat_template=CHAT_TEMPLATES[family](),
                    released_markers=True)
    return path


def hf_oracle(hf_config: dict, weights: dict[str, torch.Tensor], v32: bool = False):
    """transformers' DeepseekV3ForCausalLM (DeepseekV32ForCausalLM with v32), fp32, eager, holding the
    same weights (transformers has no MTP module: that layer is left out)."""
    import transformers
    family = "DeepseekV32" if v32 else "DeepseekV3"
    config = getattr(transformers, f"{family}Config")(**{k: v for k, v in hf_config.items() if k != "architectures"})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).float().eval()
    n_layers = hf_config["num_hidden_layers"]
    state = {name: t for name, t in weights.items() if not name.startswith(f"model.layers.{n_layers}.")}
    for i in range(n_layers):   # transformers stacks the routed experts: gate_up_proj [E, 2I, D], down_proj [E, D, I]
        pre = f"model.layers.{i}.mlp.experts"
        if f"{pre}.0.gate_proj.weight" not in state:
            continue
        e = hf_config["n_routed_experts"]
        gate = torch.stack([state.pop(f"{pre}.{j}.gate_proj.weight") for j in range(e)])
        up = torch.stack([state.pop(f"{pre}.{j}.up_proj.weight") for j in range(e)])
        state[f"{pre}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        state[f"{pre}.down_proj"] = torch.stack([state.pop(f"{pre}.{j}.down_proj.weight") for j in range(e)])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the issue's relative error."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def assert_greedy_matches_reference(reference, prompts: list[list[int]], outputs: list[list[int]]) -> None:
    """Every greedy token a backend produced is the reference LLM's argmax, or within 5% of the logit
    range of it (a near-tie that lower-precision kernels may break the other way); >= 80% exact."""
    exact = total = 0
    for p, o in zip(prompts, outputs):
        logits = reference.logits([p + o])[0]                    # [T, V]
        for i, tok in enumerate(o):
            row = logits[len(p) - 1 + i]
            best = int(row.argmax())
            exact += tok == best
            total += 1
            assert tok == best or row[best] - row[tok] <= 0.05 * (row.max() - row.min()), (p, i, tok, best)
    assert exact / total >= 0.8


def fp8_checkpoint(tmp_path_factory, name: str, seed: int, **kw):
    """A tiny FP8-block checkpoint in bf16 without a tokenizer, under a fresh temp dir: the fixture of
    the hostile-file and load-robustness tests."""
    path, _ = make_checkpoint(tmp_path_factory.mktemp(name) / "ckpt", tiny_config(), seed=seed, fmt="fp8-block",
                              dtype=torch.bfloat16, tokenizer=False, **kw)
    return path


def oracle_speculation_failures(model, cache, runner, prompts, new: int, ks, max_batch_tokens: int,
                                monkeypatch) -> list[str]:
    """Greedy MTP with oracle drafts (each sequence's plain greedy continuation, computed max(ks) tokens past
    the compared length so the last verify step's drafts are right too) against plain greedy, for batch
    1..len(prompts) and each k: one line per (batch, k) whose output differs or that emits other than
    k + 1 tokens per verify step."""
    from dsv3.core.engine import Engine
    from dsv3.core.sampling import SamplingParams
    from dsv3.core.speculative import MTPDrafter

    def generate(engine, batch, n):
        seqs = [engine.add(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p in batch]
        engine.run_to_completion()
        return [s.output_ids for s in seqs]

    failures = []
    for b in range(1, len(prompts) + 1):
        batch = prompts[:b]
        want = generate(Engine(model, cache, None, max_batch_tokens, runner, prefix_caching=False), batch, new + max(ks))
        truth = {tuple(p): w for p, w in zip(batch, want)}

        def propose(work, rows, logits, j):
            return torch.tensor([truth[tuple(s.token_ids[: s.prompt_len])][len(s.output_ids) + j] for s, *_ in work],
                                device=logits.device), None
        for k in ks:
            with monkeypatch.context() as m:
                m.setattr(MTPDrafter, "_propose", staticmethod(propose))
                spec = Engine(model, cache, None, max_batch_tokens, runner, num_draft_tokens=k, prefix_caching=False,
                              draft_policy="always")      # every step verifies: k + 1 tokens each
                got = generate(spec, batch, new)
            per_step = spec.stats.spec.mean_accepted_length
            if got != [w[:new] for w in want] or per_step != k + 1:
                failures.append(f"batch {b} k {k}: {per_step:.2f} tokens per verify step, "
                                f"output {'==' if got == [w[:new] for w in want] else '!='} plain")
    return failures


def run_chunks(llm, cache, chunks):
    """One forward of `chunks` (dsv3.core.batch.Chunk) over `cache`: each chunk's logits rows."""
    from dsv3.core.batch import Batch
    batch = Batch.build(chunks, cache.block_size, "cpu")
    with torch.inference_mode():
        hidden = llm.model(batch, cache.layers)
        return [llm.model.logits(hidden[rows]) for rows in batch.token_rows]


def check_decode_beside_chunked_prefill(llm, cache, seqs, blocks, steps: int, chunk: int, seed: int = 1):
    """Prefill seqs[0] and seqs[1], then `steps` steps that each decode one random token for both beside
    the next `chunk` tokens of seqs[2]'s chunked prefill: every row's logits within 1e-4 of recomputing
    its whole sequence. seqs are extended in place; returns (done lengths, the generator) for more steps."""
    from dsv3.core.batch import Chunk
    run_chunks(llm, cache, [Chunk(seqs[0], 0, blocks[0]), Chunk(seqs[1], 0, blocks[1])])
    done = [len(seqs[0]), len(seqs[1]), 0]
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        new = [torch.randint(2, llm.config.vocab_size, (1,), generator=g).item() for _ in range(2)]
        chunk3 = seqs[2][done[2]: done[2] + chunk]
        chunks = [Chunk([new[0]], done[0], blocks[0], decode=True), Chunk([new[1]], done[1], blocks[1], decode=True)]
        if chunk3:
            chunks.append(Chunk(chunk3, done[2], blocks[2]))
        out = run_chunks(llm, cache, chunks)
        for i in range(2):
            seqs[i] = seqs[i] + [new[i]]
            done[i] += 1
            full = llm.logits([seqs[i]])[0, -1]
            assert rel_err(out[i][-1], full) < 1e-4, f"step {step} seq {i}"
        if chunk3:
            done[2] += len(chunk3)
            full = llm.logits([seqs[2][: done[2]]])[0, -len(chunk3):]
            assert rel_err(out[2], full) < 1e-4, f"chunked prefill step {step}"
    return done, g


def hand_built_mtp_logits(oracle, weights: dict, n_layers: int, ids: list[int], block: int = 1) -> torch.Tensor:
    """The MTP module of the paper, built by hand around transformers' own decoder layer `block` (whose
    weights the MTP layer copies): logits_i = head(norm(layer(eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)])))),
    h_i the main model's last hidden state (after model.norm), slot i at position i. [T-1, V]."""
    def w(suffix):
        return weights[f"model.layers.{n_layers}.{suffix}"]

    def rms(x, weight, eps=1e-6):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    with torch.no_grad():
        tokens = torch.tensor([ids])
        h = oracle.model(tokens).last_hidden_state[0]
        emb = torch.nn.functional.embedding(tokens[0, 1:], w("embed_tokens.weight"))   # t_{i+1}
        x = torch.cat([rms(emb, w("enorm.weight")), rms(h[:-1], w("hnorm.weight"))], dim=-1) @ w("eh_proj.weight").T
        positions = torch.arange(len(ids) - 1)[None]
        rope = oracle.model.rotary_emb(x[None], positions)
        mask = torch.full((len(ids) - 1, len(ids) - 1), float("-inf")).triu(1)[None, None]
        y = oracle.model.layers[block](x[None], attention_mask=mask, position_ids=positions, position_embeddings=rope)
        y = y[0] if isinstance(y, tuple) else y
        return rms(y[0], w("shared_head.norm.weight")) @ w("shared_head.head.weight").T


def assert_cache_matches_a_fresh_pass(llm, cache, seq) -> None:
    """seq's rows in `cache` (every main layer and the MTP layer, positions 0 .. seq.num_cached - 1) equal
    a recomputation of its tokens through a fresh cache of the same block size with `llm`'s model: main
    layers over the tokens, the MTP layer over the next tokens with the true hidden states. What an
    engine's cache must hold after speculative steps with rejections, drafting or not in between."""
    from dsv3.core.batch import Batch, Chunk
    from dsv3.core.cache import LatentCache
    n, bs, width = seq.num_cached, cache.block_size, llm.config.latent_dim
    fresh = LatentCache(llm.model.num_cache_layers, -(-(n + 1) // bs) + 1, bs, width, torch.float32, "cpu")
    blocks = fresh.allocator.allocate(fresh.blocks_needed(n + 1))
    with torch.inference_mode():
        b = Batch.build([Chunk(seq.token_ids[:n], 0, blocks)], bs, "cpu")
        hidden = llm.model(b, fresh.layers)
        m = Batch.build([Chunk(seq.token_ids[1:n + 1], 0, blocks)], bs, "cpu")
        llm.model.mtp_hidden(m.input_ids, hidden, m, fresh.layers)

    def slots(table):
        return torch.tensor([table[i // bs] * bs + i % bs for i in range(n)])
    for layer in range(llm.model.num_cache_layers):
        ours = cache.layers[layer].view(-1, width)[slots(seq.blocks)]
        theirs = fresh.layers[layer].view(-1, width)[slots(blocks)]
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5), f"cache layer {layer}"


def oracle_drafts(monkeypatch, reference: dict, wrong_rate: float, rng) -> None:
    """Make the MTP drafter propose the true greedy continuation (reference: prompt tuple -> output ids),
    corrupted at `wrong_rate` (rng: a random.Random; vocab 96): exercises full acceptance, partial
    acceptance and rejection deterministically against a known answer."""
    from dsv3.core.speculative import MTPDrafter

    def propose(work, rows, logits, draft):
        tokens = []
        for seq, *_ in work:
            truth = reference[tuple(seq.token_ids[: seq.prompt_len])]
            j = len(seq.output_ids) + draft
            tok = truth[j] if j < len(truth) else 5
            if rng.random() < wrong_rate:
                tok = (tok + 1 + rng.randrange(90)) % 96
            tokens.append(tok)
        return torch.tensor(tokens, device=logits.device), None
    monkeypatch.setattr(MTPDrafter, "_propose", staticmethod(propose))
