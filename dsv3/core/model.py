"""DeepSeek-V3: MLA, DeepSeekMoE and multi-token prediction, top-down, in plain PyTorch.

Every hot op goes through `self.ops` (dsv3.core.ops), resolved once when the model is built; no
vendor code here. Parameter names are the checkpoint's (HF layout), so loading is an identity map
plus one rename: routed experts are stored per expert in the checkpoint and stacked here.

Shapes: T tokens of a flat batch (prefill chunks and decode tokens of many sequences together),
D hidden, H heads, C kv_lora_rank, R qk_rope_head_dim, E routed experts, V vocab.

Parallelism (dsv3.core.layout): a model built with a `Mesh` holds one rank's slice: H/tp heads, 1/tp of
the dense and shared-expert intermediate rows, V/tp vocabulary rows, its routed experts. The few
places where slices are joined say so (`mesh.tp_reduce`, `mesh.gather_vocab`, `mesh.routed_experts`);
with the default single-process mesh those are the identity and nothing else changes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.core.batch import Batch
from dsv3.core.config import ModelConfig
from dsv3.core.ops import ExpertWeights, GateSpec, Ops
from dsv3.core.weights import STORAGE_DTYPE, QuantWeight, dequantize, scale_shape
from dsv3.core.layout import SINGLE, Mesh


class Linear(nn.Module):
    """y = x W^T with W in one weight format; `weight` (+ scale) named as in the checkpoint."""

    def __init__(self, ops: Ops, in_features: int, out_features: int, fmt: str, dtype: torch.dtype,
                 experts: int | None = None):
        super().__init__()
        self.ops, self.format = ops, fmt
        self.act_scale_fmt = None   # "ue8m0": power-of-two activation scales (V3.1); set by DeepseekV3
        lead = () if experts is None else (experts,)
        self.weight = nn.Parameter(torch.empty(*lead, out_features, in_features,
                                               dtype=STORAGE_DTYPE.get(fmt, dtype)), requires_grad=False)
        shape = scale_shape(fmt, out_features, in_features)
        self.scale_name = "weight_scale" if fmt == "int8-w8a8" else "weight_scale_inv"
        if shape is not None:
            self.register_parameter(self.scale_name, nn.Parameter(
                torch.empty(*lead, *shape, dtype=torch.float32), requires_grad=False))

    @property
    def qweight(self) -> QuantWeight:
        return QuantWeight(self.weight, getattr(self, self.scale_name, None), self.format, self.act_scale_fmt)

    def forward(self, x):
        return self.ops.linear(x, self.qweight)


class RMSNorm(nn.Module):
    def __init__(self, ops: Ops, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.ops, self.eps = ops, eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x):
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add(self, x, residual):
        """(norm(x + residual), x + residual): the pre-norm residual stream, fused."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


def yarn_rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_position_embeddings, R/2] float32 for RoPE with YaRN frequency blending."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    attention_factor = 1.0
    y = cfg.rope_scaling
    if y is not None:
        def correction_dim(rotations):  # the dim whose wavelength fits `rotations` turns in the original context
            return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(correction_dim(y.beta_fast)), 0)
        high = min(math.ceil(correction_dim(y.beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low)
                / max(high - low, 1e-3)).clamp(0, 1)
        extrapolate = 1 - ramp            # 1: keep the original frequency (high-frequency dims)
        inv_freq = inv_freq / y.factor * (1 - extrapolate) + inv_freq * extrapolate
        attention_factor = y.attention_factor()
    angles = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32, device=device), inv_freq)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


SCORE_ROWS = 1024   # V3.2: queries scored at once (1024 x 128k positions x 4 bytes = 512 MiB)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (the V3.2 indexer's k_norm), in float32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype), requires_grad=False)

    def forward(self, x):
        return F.layer_norm(x.float(), self.weight.shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class Indexer(nn.Module):
    """DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2): which cached tokens each query sees.

    Per token, Hi index-head queries q_h = wq_b(q latent) and one key k = LayerNorm(wk(x)), shared by the
    heads and cached beside the token's latent; both rotated on their first R dims in the half-split RoPE
    layout (pairs (x_i, x_{i+R/2}); MLA's pairs are interleaved). Query t scores cached token s with
    sum_h w_{t,h} relu(q_{t,h} . k_s), w = weights_proj(x) / sqrt(Hi * Di), and attends to the index_topk
    best of the tokens it may see (all of them while they are fewer).
    """

    def __init__(self, ops: Ops, cfg: ModelConfig, fmt: str, dtype: torch.dtype):
        super().__init__()
        self.ops, self.topk = ops, cfg.index_topk
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.wq_b = Linear(ops, cfg.q_lora_rank, self.n_heads * self.head_dim, fmt, dtype)
        self.wk = Linear(ops, cfg.hidden_size, self.head_dim, fmt, dtype)
        self.k_norm = LayerNorm(self.head_dim, 1e-6, dtype)
        self.weights_proj = Linear(ops, cfg.hidden_size, self.n_heads, "dense", dtype)   # never quantised
        # the half-split layout as the interleaved one the rope op rotates: interleaved slot i holds
        # half-split dim i // 2 + (i % 2) * R/2, and the inverse permutation puts the result back
        half = self.rope_dim // 2
        perm = torch.tensor([i // 2 + (i % 2) * half for i in range(self.rope_dim)])
        self.register_buffer("to_interleaved", perm, persistent=False)
        self.register_buffer("from_interleaved", perm.argsort(), persistent=False)

    def rotate(self, x, positions, rope):
        """x [T, n, Di]: RoPE on the first R dims, half-split pairs."""
        rotated = self.ops.rope(x[..., self.to_interleaved], positions, *rope)[..., self.from_interleaved]
        return torch.cat((rotated, x[..., self.rope_dim:]), dim=-1)

    def forward(self, x, q_latent, batch: Batch, cache: torch.Tensor, rope) -> torch.Tensor:
        """x [T, D] (the attention input), q_latent [T, q_lora_rank] -> chosen cache slots [T, K] (-1: none).
        Writes this step's indexer keys into the cache first, so a prefill chunk sees its own tokens."""
        ops, t = self.ops, x.shape[0]
        q = self.rotate(self.wq_b(q_latent).view(t, self.n_heads, self.head_dim), batch.positions, rope)  # [T, Hi, Di]
        k = self.rotate(self.k_norm(self.wk(x)).unsqueeze(1), batch.positions, rope).squeeze(1)          # [T, Di]
        ops.write_index_cache(cache, k, batch.slots)
        weights = self.weights_proj(x).float() * (self.n_heads * self.head_dim) ** -0.5                # [T, Hi]
        if batch.num_decode_tokens == t:   # decode-only steps (and captured graphs) carry only the decode tables
            table, lens = batch.decode_block_table, batch.decode_context_lens
        else:
            table, lens = batch.block_table, batch.context_lens
        # [rows, N] float32 scores per run of SCORE_ROWS queries: a long prefill chunk against a long context
        # (8192 x 128k) would otherwise hold 4 GiB of scores at once
        picked = [ops.index_topk(ops.index_scores(q[r:r + SCORE_ROWS], weights[r:r + SCORE_ROWS], cache,
                                                  table[r:r + SCORE_ROWS], lens[r:r + SCORE_ROWS]),
                                 table[r:r + SCORE_ROWS], self.topk) for r in range(0, t, SCORE_ROWS)]
        return picked[0] if len(picked) == 1 else torch.cat(picked)                                      # [T, K]


class MLA(nn.Module):
    """Multi-head Latent Attention.

    q = q_b(norm(q_a(x))) per head [nope | rope]; kv_a(x) = [latent C | k_rope R], the latent normed.
    Only (latent, k_rope) are cached. Prefill expands the cached latents with kv_b into per-head
    k_nope and v (naive). Decode absorbs kv_b: q_nope @ W_UK moves the query into latent space, the
    attention runs over the cache directly, and W_UV maps the result back (absorbed).
    DeepSeek-V3.2 (DSA) adds an Indexer: every token, prefill or decode, attends absorbed to the
    index_topk cached tokens it picks (sparse_mla), never to the whole context.
    """

    def __init__(self, ops: Ops, cfg: ModelConfig, fmt: str, dtype: torch.dtype, mesh: Mesh = SINGLE):
        super().__init__()
        self.ops, self.cfg, self.mesh = ops, cfg, mesh
        # tensor parallel: this rank's H/tp heads. q_b / kv_b are split by output rows (heads), o_proj
        # by input columns; q_a / kv_a and the latent (shared by all heads) are whole on every rank.
        self.n_heads = cfg.num_attention_heads // mesh.tp
        self.nope, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.kv_rank, self.v_dim = cfg.kv_lora_rank, cfg.v_head_dim
        q_out = self.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(ops, cfg.hidden_size, q_out, fmt, dtype)
        else:
            self.q_a_proj = Linear(ops, cfg.hidden_size, cfg.q_lora_rank, fmt, dtype)
            self.q_a_layernorm = RMSNorm(ops, cfg.q_lora_rank, cfg.rms_norm_eps, dtype)
            self.q_b_proj = Linear(ops, cfg.q_lora_rank, q_out, fmt, dtype)
        self.kv_a_proj_with_mqa = Linear(ops, cfg.hidden_size, cfg.latent_dim, fmt, dtype)
        self.kv_a_layernorm = RMSNorm(ops, cfg.kv_lora_rank, cfg.rms_norm_eps, dtype)
        self.kv_b_proj = Linear(ops, cfg.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), fmt, dtype)
        self.o_proj = Linear(ops, self.n_heads * self.v_dim, cfg.hidden_size, fmt, dtype)
        self.softmax_scale = cfg.softmax_scale
        # The absorbed decode weights, kv_b split per head: W_UK [H, nope, C] and W_UV [H, v, C] in the
        # activation dtype. Buffers, not parameters (no checkpoint tensor holds them): made from kv_b
        # by prepare_weights() once the weights are loaded, and counted by `dsv3-run plan`.
        self.register_buffer("w_uk", torch.empty(self.n_heads, self.nope, self.kv_rank, dtype=dtype), persistent=False)
        self.register_buffer("w_uv", torch.empty(self.n_heads, self.v_dim, self.kv_rank, dtype=dtype), persistent=False)
        # DeepSeek-V3.2: the indexer is small and whole on every rank (its heads are not split)
        self.indexer = Indexer(ops, cfg, fmt, dtype) if cfg.sparse_attention else None

    @torch.no_grad()
    def prepare_weights(self):
        w = dequantize(self.kv_b_proj.qweight, self.w_uk.dtype).view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        self.w_uk.copy_(w[:, : self.nope])
        self.w_uv.copy_(w[:, self.nope:])

    def forward(self, x, batch: Batch, cache: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        ops, t = self.ops, x.shape[0]
        q_latent = None if self.cfg.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))   # [T, q_lora_rank]
        q = self.q_proj(x) if q_latent is None else self.q_b_proj(q_latent)
        q = q.view(t, self.n_heads, self.nope + self.rope_dim)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        q_rope = ops.rope(q_rope, batch.positions, *rope)                          # [T, H, R]
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)                                        # [T, C]
        k_rope = ops.rope(k_rope.unsqueeze(1), batch.positions, *rope).squeeze(1)   # [T, R], one head shared
        ops.write_latent_cache(cache, latent, k_rope, batch.slots)
        if self.indexer is not None:   # sparse (V3.2): absorbed attention over the slots the indexer picks
            slots = self.indexer(x, q_latent, batch, cache, rope)                     # [T, K]
            q_abs = torch.einsum("thn,hnc->thc", q_nope, self.w_uk)                   # [T, H, C]
            o_latent = ops.sparse_mla(q_abs, q_rope.contiguous(), cache, slots, self.softmax_scale)
            out = torch.einsum("thc,hvc->thv", o_latent, self.w_uv)
            return self.mesh.tp_reduce(self.o_proj(out.reshape(t, -1)))

        out = x.new_empty(t, self.n_heads, self.v_dim)
        nd = batch.num_decode_tokens
        if nd:  # absorbed: attend in latent space over the paged cache
            w_uk, w_uv = self.w_uk, self.w_uv
            q_latent = torch.einsum("thn,hnc->thc", q_nope[:nd], w_uk)             # [Td, H, C]
            o_latent = ops.mla_decode(q_latent, q_rope[:nd].contiguous(), cache, batch.decode_block_table,
                                      batch.decode_context_lens, self.softmax_scale)
            out[:nd] = torch.einsum("thc,hvc->thv", o_latent, w_uv)
        if nd < t:  # naive: expand every cached latent of the prefilling sequences into keys and values
            kv = cache.view(-1, cache.shape[-1])[batch.prefill_gather_slots].to(x.dtype)   # [Tk, C + R]
            ctx_latent, ctx_rope = kv.split([self.kv_rank, self.rope_dim], dim=-1)
            k_nope, v = self.kv_b_proj(ctx_latent).view(-1, self.n_heads, self.nope + self.v_dim).split(
                [self.nope, self.v_dim], dim=-1)
            k = torch.cat((k_nope, ctx_rope.unsqueeze(1).expand(-1, self.n_heads, -1)), dim=-1)
            qp = torch.cat((q_nope[nd:], q_rope[nd:]), dim=-1)
            out[nd:] = ops.mla_prefill(qp, k, v.contiguous(), batch.cu_seqlens_q, batch.cu_seqlens_k,
                                       self.softmax_scale)
        return self.mesh.tp_reduce(self.o_proj(out.view(t, -1)))   # sum over the ranks' heads


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, ops: Ops, dim: int, inter: int, fmt: str, dtype: torch.dtype, mesh: Mesh = SINGLE):
        super().__init__()
        self.ops, self.mesh = ops, mesh
        inter //= mesh.tp   # tensor parallel: gate/up split by rows, down by columns
        self.gate_proj = Linear(ops, dim, inter, fmt, dtype)
        self.up_proj = Linear(ops, dim, inter, fmt, dtype)
        self.down_proj = Linear(ops, inter, dim, fmt, dtype)

    def forward(self, x):
        return self.mesh.tp_reduce(self.down_proj(self.ops.silu_mul(self.gate_proj(x), self.up_proj(x))))


class Gate(nn.Module):
    """noaux_tc router: sigmoid affinities; the bias steers only which experts are chosen."""

    def __init__(self, ops: Ops, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                                                    requires_grad=False)
        self.spec = GateSpec(cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
                             cfg.routed_scaling_factor)

    def forward(self, x):
        return self.ops.moe_gate(x, self.weight, self.e_score_correction_bias, self.spec)  # [T, k], [T, k]


class Experts(nn.Module):
    """The routed experts, stacked: gate/up [E, I, D], down [E, D, I] (checkpoint: experts.{e}.*)."""

    def __init__(self, ops: Ops, cfg: ModelConfig, fmt: str, dtype: torch.dtype, mesh: Mesh = SINGLE):
        super().__init__()
        # expert parallel: experts [first_expert, first_expert + n) and 1/(W/ep) of each one's rows
        self.first_expert, n = mesh.expert_range(cfg.n_routed_experts)
        d, inter = cfg.hidden_size, cfg.moe_intermediate_size // mesh.moe_tp
        self.gate_proj = Linear(ops, d, inter, fmt, dtype, experts=n)
        self.up_proj = Linear(ops, d, inter, fmt, dtype, experts=n)
        self.down_proj = Linear(ops, inter, d, fmt, dtype, experts=n)

    @property
    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.gate_proj.qweight, self.up_proj.qweight, self.down_proj.qweight, self.first_expert)


class MoE(nn.Module):
    """DeepSeekMoE: sum_k w_k expert_k(x) over the routed top-k, plus the always-on shared experts."""

    def __init__(self, ops: Ops, cfg: ModelConfig, fmt: str, dtype: torch.dtype, mesh: Mesh = SINGLE, layer: int = 0):
        super().__init__()
        self.ops, self.mesh, self.layer = ops, mesh, layer   # layer: where the ranks meet (data-parallel attention)
        self.gate = Gate(ops, cfg, dtype)
        self.experts = Experts(ops, cfg, fmt, dtype, mesh)
        self.shared_experts = (MLP(ops, cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, fmt, dtype,
                                   mesh) if cfg.n_shared_experts else None)

    def forward(self, x):
        if self.mesh.distributed:   # experts live on many ranks: route tokens to them and back
            y = self.mesh.routed_experts(x, self.gate, self.ops.moe_experts, self.experts.weights, self.layer)
        else:
            weights, ids = self.gate(x)                                             # [T, k], [T, k]
            y = self.ops.moe_experts(x, weights, ids, self.experts.weights)
        return y if self.shared_experts is None else y + self.shared_experts(x)

    def join(self, most: int, dim: int, device) -> None:
        """Data-parallel attention: this group has no rows for the layer the other groups are at; join
        its exchange with none (their tokens may need the experts held here)."""
        empty = torch.zeros(0, dim, dtype=self.gate.weight.dtype, device=device)
        self.mesh.comm.join_routed_experts(self.mesh, empty, most, self.gate, self.ops.moe_experts, self.experts.weights)


class Block(nn.Module):
    """Pre-norm decoder layer: x + MLA(norm(x)), then + FFN(norm(.)); FFN is MLP or MoE by layer index."""

    def __init__(self, ops: Ops, cfg: ModelConfig, layer: int, fmt: str, dtype: torch.dtype, mesh: Mesh = SINGLE):
        super().__init__()
        self.self_attn = MLA(ops, cfg, fmt, dtype, mesh)
        self.mlp = MoE(ops, cfg, fmt, dtype, mesh, layer) if cfg.is_moe_layer(layer) else MLP(
            ops, cfg.hidden_size, cfg.intermediate_size, fmt, dtype, mesh)
        self.input_layernorm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x, residual, batch: Batch, cache, rope):
        """Returns (ffn output, residual stream before it); the next norm adds them (fused)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm.add(x, residual)
        x = self.self_attn(x, batch, cache, rope)
        x, residual = self.post_attention_layernorm.add(x, residual)
        return self.mlp(x), residual


class SharedHead(nn.Module):
    def __init__(self, ops: Ops, cfg: ModelConfig, dtype: torch.dtype, mesh: Mesh = SINGLE):
        super().__init__()
        self.norm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps, dtype)
        start, stop = mesh.vocab_range(cfg.vocab_size)   # vocab parallel: this rank's rows of the head
        self.head = Linear(ops, cfg.hidden_size, stop - start, "dense", dtype)


class MTPLayer(Block):
    """Multi-token prediction module (layer index num_hidden_layers).

    h' = eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)]), one decoder layer with its own latent cache,
    then shared_head -> logits for t_{i+2}. h_i is the main model's final hidden state (after norm).
    """

    def __init__(self, ops: Ops, cfg: ModelConfig, fmt: str, dtype: torch.dtype, mesh: Mesh = SINGLE):
        super().__init__(ops, cfg, cfg.num_hidden_layers, fmt, dtype, mesh)
        self.ops, self.mesh, self.vocab = ops, mesh, cfg.vocab_size
        self.embed_tokens = Embedding(ops, cfg.vocab_size, cfg.hidden_size, dtype, mesh)
        self.enorm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.eh_proj = Linear(ops, 2 * cfg.hidden_size, cfg.hidden_size, "dense", dtype)
        self.shared_head = SharedHead(ops, cfg, dtype, mesh)

    def hidden(self, next_ids, prev_hidden, batch: Batch, cache, rope):
        """next_ids [T] (token i+1), prev_hidden [T, D] (main model's h_i) -> normed hidden [T, D]."""
        x = self.eh_proj(torch.cat((self.enorm(self.embed_tokens(next_ids)), self.hnorm(prev_hidden)), dim=-1))
        x, residual = super().forward(x, None, batch, cache, rope)
        x, _ = self.shared_head.norm.add(x, residual)
        return x

    def logits(self, hidden):
        return self.mesh.gather_vocab(self.shared_head.head(hidden).float(), self.vocab)


class Embedding(nn.Module):
    def __init__(self, ops: Ops, vocab: int, dim: int, dtype: torch.dtype, mesh: Mesh = SINGLE):
        super().__init__()
        self.ops, self.mesh = ops, mesh
        self.start, stop = mesh.vocab_range(vocab)   # vocab parallel: rows [start, stop) live here
        self.weight = nn.Parameter(torch.empty(stop - self.start, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids):
        if not self.mesh.tensor_parallel:
            return self.ops.embedding(ids, self.weight)
        # each id's row lives on exactly one rank: look up the local ones, zeros elsewhere, then sum
        local = ids - self.start
        elsewhere = (local < 0) | (local >= self.weight.shape[0])
        x = self.ops.embedding(local.masked_fill(elsewhere, 0), self.weight)           # [T, D]
        return self.mesh.tp_reduce(x.masked_fill(elsewhere.unsqueeze(-1), 0))


class Decoder(nn.Module):
    """`model.*` in the checkpoint: embeddings, the decoder layers (then the MTP layer), final norm."""

    def __init__(self, ops: Ops, cfg: ModelConfig, fmt: str, dtype: torch.dtype, with_mtp: bool,
                 mesh: Mesh = SINGLE):
        super().__init__()
        self.embed_tokens = Embedding(ops, cfg.vocab_size, cfg.hidden_size, dtype, mesh)
        layers = [Block(ops, cfg, i, fmt, dtype, mesh) for i in range(cfg.num_hidden_layers)]
        if with_mtp:
            layers.append(MTPLayer(ops, cfg, fmt, dtype, mesh))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps, dtype)


class DeepseekV3(nn.Module):
    """The whole model. forward() runs one flat batch through the main layers; mtp_hidden() the MTP layer."""

    def __init__(self, cfg: ModelConfig, ops: Ops, weight_format: str = "dense",
                 dtype: torch.dtype = torch.float32, with_mtp: bool | None = None, mesh: Mesh = SINGLE):
        super().__init__()
        self.cfg, self.ops, self.weight_format, self.dtype = cfg, ops, weight_format, dtype
        self.mesh = mesh   # this rank's place among the ranks (dsv3.core.layout); SINGLE: one process
        self.has_mtp = cfg.num_nextn_predict_layers > 0 if with_mtp is None else with_mtp
        self.model = Decoder(ops, cfg, weight_format, dtype, self.has_mtp, mesh)
        if not cfg.tie_word_embeddings:
            start, stop = mesh.vocab_range(cfg.vocab_size)   # vocab parallel, like the embedding
            self.lm_head = Linear(ops, cfg.hidden_size, stop - start, "dense", dtype)
        self._rope = None
        self.set_act_scale_fmt(cfg.act_scale_fmt)

    @property
    def num_cache_layers(self) -> int:
        return self.cfg.num_hidden_layers + int(self.has_mtp)

    @property
    def mtp(self) -> MTPLayer:
        return self.model.layers[self.cfg.num_hidden_layers]

    def prepare_weights(self):
        """What the loaded weights imply and decode needs: the absorbed MLA weights of every layer.
        Called by the loader after every load (and by whoever writes weights another way)."""
        for module in self.modules():
            if isinstance(module, MLA):
                module.prepare_weights()

    def rope_tables(self, device):
        if self._rope is None or self._rope[0].device != torch.device(device):
            self._rope = yarn_rope_tables(self.cfg, device)
        return self._rope

    def forward(self, batch: Batch, caches: list[torch.Tensor]) -> torch.Tensor:
        """Main model over a flat batch -> final normed hidden states [T, D]."""
        rope = self.rope_tables(batch.input_ids.device)
        x, residual = self.model.embed_tokens(batch.input_ids), None
        for i in range(self.cfg.num_hidden_layers):
            x, residual = self.model.layers[i](x, residual, batch, caches[i], rope)
        x, _ = self.model.norm.add(x, residual) if residual is not None else (self.model.norm(x), None)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.lm_head if not self.cfg.tie_word_embeddings else None
        if head is None:
            logits = self.ops.linear(hidden, QuantWeight(self.model.embed_tokens.weight, None, "dense")).float()
        else:
            logits = head(hidden).float()                                        # [T, V/tp]
        return self.mesh.gather_vocab(logits, self.cfg.vocab_size)           # [T, V] on every rank

    def mtp_hidden(self, next_ids, prev_hidden, batch: Batch, caches: list[torch.Tensor]) -> torch.Tensor:
        rope = self.rope_tables(batch.input_ids.device)
        return self.mtp.hidden(next_ids, prev_hidden, batch, caches[self.cfg.num_hidden_layers], rope)

    def join_other_groups(self) -> None:
        """Data-parallel attention (mesh.dp > 1): this group's forwards for the step are done; join the
        MoE layers the other groups still run, with zero rows, until every group is done. Every rank
        calls it at the end of every engine step, so groups with fewer (or no) forwards stay in step."""
        moe = {m.layer: m for m in self.modules() if isinstance(m, MoE)}
        device = self.model.embed_tokens.weight.device
        while (at := self.mesh.comm.next_exchange()) is not None:
            layer, most = at
            moe[layer].join(most, self.cfg.hidden_size, device)

    def set_act_scale_fmt(self, fmt: str | None) -> None:
        """How every quantised projection's FP8 activation scales are rounded (QuantWeight.act_scale_fmt):
        the checkpoint's `scale_fmt` by default; a profile's `ue8m0` overrides it."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.act_scale_fmt = fmt

    def set_ops(self, ops: Ops) -> None:
        """Rebind every module to a new op table (e.g. after a backend's weight preparation)."""
        self.ops = ops
        for m in self.modules():
            if hasattr(m, "ops"):
                m.ops = ops
