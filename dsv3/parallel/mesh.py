"""The mesh of one run: which slice of the model a rank holds, and the collectives that join slices.

W ranks (torchrun's WORLD_SIZE) hold the model two ways at once:

- Tensor parallel, groups of `tp` consecutive ranks: attention heads, the dense MLPs, the shared
  experts and the vocabulary (embedding, LM head) are split `tp` ways. The W/tp groups are replicas.
- Routed experts are spread over all W ranks: `ep` expert groups of E/ep experts each; inside an
  expert group of W/ep ranks, each expert's intermediate dimension is split W/ep ways. So ep = W is
  pure expert parallelism (whole experts per rank) and ep = 1 splits every expert across all ranks;
  either way a rank holds 1/W of the routed experts, which are 97% of DeepSeek-V3's weights.

Every rank runs the same schedule over the same tokens, and every collective returns identical
bits on every rank, so hidden states between layers (and the logits) are identical everywhere and
ranks sample the same tokens. A failed or timed-out collective raises DistributedError naming the
rank and the collective; nothing hangs past the process group's timeout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dsv3.core.errors import Dsv3Error
from dsv3.parallel import moe


class DistributedError(Dsv3Error):
    """A collective failed: a peer rank died, or the collective timed out."""


# torch >= 2.13 names it all_gather_single; older releases all_gather_into_tensor (same semantics)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_WIRE = {torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz, torch.bool}


def wire(t: torch.Tensor) -> torch.Tensor:
    """The tensor as collectives carry it: fp8 (and bool) as a uint8 view, since gloo/NCCL/HCCL do
    not all know those dtypes; byte-identical, so the receiver views it back."""
    return t.view(torch.uint8) if t.dtype in _WIRE else t


@dataclass
class Mesh:
    """One rank's place among the W = world ranks, and its process groups."""
    world: int = 1
    rank: int = 0
    tp: int = 1
    ep: int = 1
    # Process groups; None = no collective (one process, or tp == 1 for tp_group). Under torchrun a
    # world of one still has groups, so `torchrun --nproc-per-node 1` runs every collective.
    tp_group: object = field(default=None, repr=False)      # this rank's tensor-parallel group
    world_group: object = field(default=None, repr=False)   # all ranks (the default group)
    # MoE layers with at most this many tokens per rank take the sync-free path (all-reduce combine,
    # static shapes: decode, CUDA graphs); bigger ones dispatch with all_to_all (uneven splits).
    sync_free_max_tokens: int = 256

    def __post_init__(self):
        if self.world % self.tp or self.world % self.ep:
            raise ValueError(f"tp={self.tp} and ep={self.ep} must divide the world size {self.world}")

    @property
    def distributed(self) -> bool:
        return self.world_group is not None

    # -- layout --------------------------------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def moe_tp(self) -> int:
        """Ranks that split each routed expert's intermediate dimension (W / ep)."""
        return self.world // self.ep

    def tp_range(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's 1/tp of n (heads, intermediate rows); n % tp == 0 is checked
        by dsv3.parallel.sharding before the model is built."""
        per = n // self.tp
        return self.tp_rank * per, (self.tp_rank + 1) * per

    def vocab_range(self, vocab: int) -> tuple[int, int]:
        """[start, stop) of this rank's vocabulary rows: ceil(V/tp) each, the last rank fewer if uneven."""
        per = -(-vocab // self.tp)
        return min(self.tp_rank * per, vocab), min((self.tp_rank + 1) * per, vocab)

    def expert_range(self, n_experts: int) -> tuple[int, int]:
        """(first expert id, number of experts) this rank holds."""
        per = n_experts // self.ep
        return (self.rank // self.moe_tp) * per, per

    def expert_inter_range(self, inter: int) -> tuple[int, int]:
        """[start, stop) of the intermediate rows of each held expert (all of them when ep == W)."""
        per, j = inter // self.moe_tp, self.rank % self.moe_tp
        return j * per, (j + 1) * per

    # -- collectives ---------------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
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
        self._call("all_reduce over the tensor-parallel group", dist.all_reduce, x, group=self.tp_group)
        return x

    def world_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_group is None:
            return x
        self._call("all_reduce over all ranks", dist.all_reduce, x, group=self.world_group)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        """[T, V/tp] per rank -> [T, V] on every rank (vocab-parallel LM head)."""
        if self.tp_group is None:
            return logits
        per = -(-vocab // self.tp)
        local = logits if logits.shape[-1] == per else torch.nn.functional.pad(logits, (0, per - logits.shape[-1]))
        out = logits.new_empty(self.tp * logits.shape[0], per)                 # rank-major [tp * T, V/tp]
        self._call("all_gather of the logits", _all_gather, out, local.contiguous(), group=self.tp_group)
        return out.view(self.tp, -1, per).permute(1, 0, 2).reshape(logits.shape[0], -1)[:, :vocab]

    def gather_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Row shards of sizes[r] rows on rank r (over all ranks) -> all rows, in rank order, everywhere."""
        most = max(sizes)
        padded = x if x.shape[0] == most else torch.cat((x, x.new_zeros(most - x.shape[0], *x.shape[1:])))
        out = x.new_empty(self.world * most, *x.shape[1:])
        self._call("all_gather of the MoE outputs", _all_gather, wire(out), wire(padded.contiguous()),
                   group=self.world_group)
        if all(s == most for s in sizes):
            return out
        return torch.cat([out[r * most: r * most + s] for r, s in enumerate(sizes)])

    def all_to_all(self, x: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], what: str) -> torch.Tensor:
        """Rows x[sum(send_sizes[:d]) ...] go to rank d; returns the rows received, in rank order."""
        out = x.new_empty(sum(recv_sizes), *x.shape[1:])
        self._call(what, dist.all_to_all_single, wire(out), wire(x.contiguous()), recv_sizes, send_sizes,
                   group=self.world_group)
        return out

    def routed_experts(self, x: torch.Tensor, gate, experts_op, weights) -> torch.Tensor:
        """The routed-expert part of a MoE layer across ranks; see dsv3.parallel.moe."""
        return moe.routed_experts(self, x, gate, experts_op, weights)


SINGLE = Mesh()   # one process: every slice is the whole, every collective the identity
