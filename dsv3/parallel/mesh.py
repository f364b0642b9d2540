"""The collectives that join one rank's slices with the others', over torch.distributed process groups.

The layout itself (which slice a rank holds) is dsv3.core.layout.Mesh, frozen and all the model
needs; `ProcessGroups` is the `comm` such a mesh carries under torchrun, and `process_mesh` builds one.

Without data-parallel attention every rank runs the same schedule over the same tokens, and every
collective returns identical bits on every rank, so hidden states between layers (and the logits)
are identical everywhere and ranks sample the same tokens. With it (dp > 1) that holds inside each
tensor-parallel group; the groups run their own schedules and meet only in the MoE layers, agreeing
before each one on its index and the largest group's rows (`agree_exchange`), so that a group with
fewer forwards in a step joins the others' layers with zero rows (`next_exchange`). A failed or timed-out collective raises DistributedError naming the
rank and the collective; nothing hangs past the process group's timeout.
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist

from dsv3.core.errors import Dsv3Error
from dsv3.core.layout import SINGLE, Mesh
from dsv3.parallel import moe

__all__ = ["SINGLE", "DistributedError", "Mesh", "ProcessGroups", "process_mesh", "wire"]


class DistributedError(Dsv3Error):
    """A collective failed: a peer rank died, or the collective timed out."""


# torch >= 2.13 names it all_gather_single; older releases all_gather_into_tensor (same semantics)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_WIRE = {torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz, torch.bool}


def wire(t: torch.Tensor) -> torch.Tensor:
    """The tensor as collectives carry it: fp8 (and bool) as a uint8 view, since gloo/NCCL/HCCL do
    not all know those dtypes; byte-identical, so the receiver views it back."""
    return t.view(torch.uint8) if t.dtype in _WIRE else t


class ProcessGroups:
    """torch.distributed collectives for one rank: the `comm` of a Mesh under torchrun.

    Under torchrun a world of one still has groups, so `torchrun --nproc-per-node 1` runs every
    collective. `sync_free_max_tokens` is a runtime policy (tests and benchmarks move it): MoE layers
    with at most this many tokens per rank take the sync-free path (all-reduce combine, static shapes:
    decode, CUDA graphs); bigger ones dispatch with all_to_all (uneven splits)."""
    distributed = True

    def __init__(self, world: int, rank: int, tp: int, tp_group, world_group, sync_free_max_tokens: int = 256,
                 device: torch.device | str = "cpu"):
        self.world, self.rank, self.tp = world, rank, tp     # the mesh's, for messages and the vocab gather
        self.tp_group = tp_group          # this rank's tensor-parallel group; None when tp == 1 < world
        self.world_group = world_group    # all ranks (the default group)
        self.sync_free_max_tokens = sync_free_max_tokens
        self.device = torch.device(device)   # where the small agreement tensors live (NCCL: the rank's GPU)

    @property
    def tensor_parallel(self) -> bool:
        return self.tp_group is not None

    # -- collectives ---------------------------------------------------------------------------------
    def call(self, what: str, fn, *args, **kwargs):
        """fn(*args) (a torch.distributed call), its failure turned into a DistributedError."""
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as e:   # gloo: RuntimeError; NCCL: DistBackendError
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            cause = ("a peer rank died or closed its connection" if "closed" in text.lower() or "reset" in text.lower()
                     else "a peer rank did not join in time" if "timed out" in text.lower() or "timeout" in text.lower()
                     else "the collective failed")
            raise DistributedError(f"rank {self.rank}/{self.world}: {what} failed: {cause} ({text}). Every rank "
                                   f"stops; look for the first error in the other ranks' output. The timeout is "
                                   f"DSV3_DIST_TIMEOUT seconds") from e

    def tp_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the tensor-parallel group (row-parallel outputs: o_proj, down_proj); in place."""
        if self.tp_group is None:
            return x
        self.call("all_reduce over the tensor-parallel group", dist.all_reduce, x, group=self.tp_group)
        return x

    def world_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_group is None:
            return x
        self.call("all_reduce over all ranks", dist.all_reduce, x, group=self.world_group)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        """[T, V/tp] per rank -> [T, V] on every rank (vocab-parallel LM head)."""
        if self.tp_group is None:
            return logits
        per = -(-vocab // self.tp)
        local = logits if logits.shape[-1] == per else torch.nn.functional.pad(logits, (0, per - logits.shape[-1]))
        out = logits.new_empty(self.tp * logits.shape[0], per)                 # rank-major [tp * T, V/tp]
        self.call("all_gather of the logits", _all_gather, out, local.contiguous(), group=self.tp_group)
        return out.view(self.tp, -1, per).permute(1, 0, 2).reshape(logits.shape[0], -1)[:, :vocab]

    def gather_rows(self, x: torch.Tensor, sizes: list[int], within_group: bool = False) -> torch.Tensor:
        """Row shards of sizes[r] rows on rank r (over all ranks, or with within_group over this rank's
        tensor-parallel group) -> all rows, in rank order, everywhere."""
        most = max(sizes)
        padded = x if x.shape[0] == most else torch.cat((x, x.new_zeros(most - x.shape[0], *x.shape[1:])))
        out = x.new_empty(len(sizes) * most, *x.shape[1:])
        self.call("all_gather of the MoE outputs", _all_gather, wire(out), wire(padded.contiguous()),
                   group=self.tp_group if within_group else self.world_group)
        if all(s == most for s in sizes):
            return out
        return torch.cat([out[r * most: r * most + s] for r, s in enumerate(sizes)])

    def all_to_all(self, x: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], what: str) -> torch.Tensor:
        """Rows x[sum(send_sizes[:d]) ...] go to rank d; returns the rows received, in rank order."""
        out = x.new_empty(sum(recv_sizes), *x.shape[1:])
        self.call(what, dist.all_to_all_single, wire(out), wire(x.contiguous()), recv_sizes, send_sizes,
                   group=self.world_group)
        return out

    def routed_experts(self, mesh: Mesh, x: torch.Tensor, gate, experts_op, weights, layer: int = 0) -> torch.Tensor:
        """The routed-expert part of a MoE layer across ranks; see dsv3.parallel.moe."""
        return moe.routed_experts(mesh, self, x, gate, experts_op, weights, layer)

    # -- data-parallel attention: the groups meet in the MoE layers ----------------------------------
    def _agree(self, tokens: int, layer: int) -> tuple[int, int]:
        """One all_reduce (max) of [rows, layer, -layer] over all ranks -> (most rows, the layer); ranks
        with rows must all be at the same layer (ranks without send -1), or the schedules broke."""
        mine = [tokens, layer, -layer] if tokens else [0, -1, -(2**40)]
        v = torch.tensor(mine, dtype=torch.int64, device=self.device)
        self.call("all_reduce of the MoE layer agreement", dist.all_reduce, v, op=dist.ReduceOp.MAX,
                  group=self.world_group)
        most, high, low = v.tolist()
        if most and high != -low:
            raise DistributedError(f"rank {self.rank}/{self.world}: data-parallel groups reached different MoE layers "
                                   f"at once ({-low} and {high}); their step schedules diverged (a bug: report it)")
        return most, high

    def agree_exchange(self, tokens: int, layer: int) -> int:
        """A group with `tokens` rows at MoE layer `layer`: the most rows any group brings to it."""
        most, at = self._agree(tokens, layer)
        if tokens and at != layer:
            raise DistributedError(f"rank {self.rank}/{self.world}: at MoE layer {layer}, but another group is at {at}")
        return most

    def next_exchange(self) -> tuple[int, int] | None:
        """A group with no rows for now: (layer, most rows) of the MoE layer others are at, or None once
        every group is done (all sent no rows)."""
        most, layer = self._agree(0, -1)
        return (layer, most) if most else None

    def join_routed_experts(self, mesh: Mesh, x_empty: torch.Tensor, most: int, gate, experts_op, weights) -> None:
        """Join one MoE layer's exchange with zero rows (x_empty [0, D]); `most` as next_exchange said."""
        moe.exchange_across_groups(mesh, self, x_empty, most, gate, experts_op, weights)

    def gather_json(self, obj) -> list:
        """Every rank's `obj` (JSON-able), in rank order, on every rank: sizes, then the UTF-8 bytes
        (all_gather of uint8 tensors; nothing is unpickled)."""
        data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=self.device)
        sizes = torch.zeros(self.world, dtype=torch.int64, device=self.device)
        self.call("all_gather of result sizes", _all_gather, sizes, torch.tensor([data.numel()], device=self.device),
                  group=self.world_group)
        most = int(sizes.max())
        out = torch.zeros(self.world * most, dtype=torch.uint8, device=self.device)
        self.call("all_gather of results", _all_gather, out,
                  torch.nn.functional.pad(data, (0, most - data.numel())), group=self.world_group)
        return [json.loads(bytes(out[r * most: r * most + n].tolist()).decode())
                for r, n in enumerate(sizes.tolist())]

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (one all_reduce of one integer)."""
        v = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        self.call("all_reduce of the work flags", dist.all_reduce, v, op=dist.ReduceOp.MAX, group=self.world_group)
        return bool(v.item())


def process_mesh(world: int, rank: int, tp: int, ep: int, tp_group, world_group, dp: int = 1,
                 device: torch.device | str = "cpu") -> Mesh:
    """The mesh of a torchrun rank: its layout, with collectives over the given process groups."""
    return Mesh(world, rank, tp, ep, dp, comm=ProcessGroups(world, rank, tp, tp_group, world_group, device=device))
