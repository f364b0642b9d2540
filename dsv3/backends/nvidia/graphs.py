"""CUDA graphs for decode steps: one graph per batch-size bucket, captured on first use.

A decode-only batch (every token a single decode token after its cached context) of T tokens is
padded to the smallest captured bucket >= T and replayed; anything else (prefill, mixed batches,
more tokens than the largest bucket, a block table wider than the captured one) runs eagerly.
Padding rows carry token 0 at position 0, context length 1, and slot -1, which every backend's
write_latent_cache skips (the op contract; conformance checks it), so they never touch a
sequence's cache; their outputs are dropped.
"""
from __future__ import annotations

import torch

from dsv3.core.batch import Batch
from dsv3.core.ops import OP_NAMES, SPARSE_OP_NAMES, syncs_with_host

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DECODE_STEP_OPS = tuple(op for op in OP_NAMES if op != "mla_prefill")   # what a decode-only step calls


def capture_blockers(model) -> list[str]:
    """Why `model`'s decode steps cannot be captured in a CUDA graph (empty: they can): the ops that
    say they read device values back to the host (dsv3.core.ops.host_syncing). The op table is the
    one the model was built with, resolved for its weight format, so this is what would really run;
    a V3.2 model's decode also calls the sparse-attention ops."""
    step_ops = DECODE_STEP_OPS + (SPARSE_OP_NAMES if getattr(model.cfg, "sparse_attention", False) else ())
    called = [op for op in step_ops if model.cfg.n_routed_experts or not op.startswith("moe_")]
    return [f"{op} ({model.ops.providers.get(op, '?')}) synchronises with the host"
            for op in called if syncs_with_host(getattr(model.ops, op))]


class _GraphSet:
    """Captured graphs of one decode-only forward `fn(batch, caches, extra) -> [T, ...]`, one per bucket.
    `extra` is an optional per-token input [T, extra_dim] (the MTP layer's previous hidden states)."""

    def __init__(self, fn, block_size: int, max_context: int, buckets, pool_owner, extra_dim: int | None = None):
        self.fn, self.block_size, self.buckets, self.extra_dim = fn, block_size, tuple(sorted(buckets)), extra_dim
        self.max_blocks = -(-max_context // block_size)
        self.graphs: dict[int, tuple] = {}
        self.owner = pool_owner   # the CudaGraphRunner: one memory pool and one cache binding for all graphs
        self.replays = 0

    def _fits(self, batch: Batch, caches) -> int | None:
        t = batch.input_ids.shape[0]
        if batch.num_decode_tokens != t or t > self.buckets[-1] or batch.decode_block_table.shape[1] > self.max_blocks:
            return None
        if self.owner.caches is not None and any(a is not b for a, b in zip(self.owner.caches, caches)):
            return None          # graphs hold the cache tensors they were captured with
        return next(b for b in self.buckets if b >= t)

    def _capture(self, bucket: int, caches, extra: torch.Tensor | None):
        dev = caches[0].device
        static = Batch(
            input_ids=torch.zeros(bucket, dtype=torch.int64, device=dev),
            positions=torch.zeros(bucket, dtype=torch.int64, device=dev),
            slots=torch.full((bucket,), -1, dtype=torch.int64, device=dev),
            num_decode_tokens=bucket,
            decode_block_table=torch.zeros(bucket, self.max_blocks, dtype=torch.int32, device=dev),
            decode_context_lens=torch.ones(bucket, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.zeros(1, dtype=torch.int32, device=dev),
            cu_seqlens_k=torch.zeros(1, dtype=torch.int32, device=dev),
            prefill_gather_slots=torch.zeros(0, dtype=torch.int64, device=dev),
            token_rows=[])
        static_extra = None if extra is None else torch.zeros(bucket, extra.shape[-1], dtype=extra.dtype, device=dev)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):          # warm-up: compiles kernels
            for _ in range(2):
                self.fn(static, caches, static_extra)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.owner.pool is None:
            self.owner.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.owner.pool):
            out = self.fn(static, caches, static_extra)
        self.graphs[bucket] = (graph, static, static_extra, out)
        self.owner.caches = list(caches)

    def __call__(self, batch: Batch, caches, extra: torch.Tensor | None = None) -> torch.Tensor:
        bucket = self._fits(batch, caches)
        if bucket is None:
            return self.fn(batch, caches, extra)
        if bucket not in self.graphs:
            self._capture(bucket, caches, extra)
        graph, s, s_extra, out = self.graphs[bucket]
        t, w = batch.input_ids.shape[0], batch.decode_block_table.shape[1]
        s.input_ids[:t].copy_(batch.input_ids)
        s.positions[:t].copy_(batch.positions)
        s.slots[:t].copy_(batch.slots)
        s.slots[t:].fill_(-1)
        s.decode_context_lens[:t].copy_(batch.decode_context_lens)
        s.decode_context_lens[t:].fill_(1)
        s.decode_block_table[:t, :w].copy_(batch.decode_block_table)
        if s_extra is not None:
            s_extra[:t].copy_(extra)
        graph.replay()
        self.replays += 1
        return out[:t].clone()


class CudaGraphRunner:
    """`runner(batch, caches)` for the main model and, when the model has an MTP layer,
    `runner.mtp_hidden(next_ids, prev_hidden, batch, caches)` for speculative drafting; decode-only
    batches of either replay captured graphs, everything else runs eagerly."""

    def __init__(self, model, block_size: int, max_context: int, buckets=BUCKETS):
        self.model, self.pool, self.caches = model, None, None
        self.main = _GraphSet(lambda b, c, _: model(b, c), block_size, max_context, buckets, self)
        self.draft = (_GraphSet(lambda b, c, prev: model.mtp_hidden(b.input_ids, prev, b, c), block_size,
                                max_context, buckets, self, extra_dim=model.cfg.hidden_size)
                      if model.has_mtp else None)

    @property
    def graphs(self) -> dict:
        return self.main.graphs

    @property
    def replays(self) -> int:
        return self.main.replays + (self.draft.replays if self.draft else 0)

    @torch.inference_mode()
    def __call__(self, batch: Batch, caches) -> torch.Tensor:
        return self.main(batch, caches)

    @torch.inference_mode()
    def mtp_hidden(self, next_ids: torch.Tensor, prev_hidden: torch.Tensor, batch: Batch, caches) -> torch.Tensor:
        # next_ids is batch.input_ids in every caller (the MTP layer embeds the batch's tokens)
        return self.draft(batch, caches, prev_hidden)
