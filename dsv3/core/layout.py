"""Which slice of the model this rank holds, and the collectives that join slices: all the model needs.

W ranks (torchrun's WORLD_SIZE) hold the model two ways at once:

- Tensor parallel, groups of `tp` consecutive ranks: attention heads, the dense MLPs, the shared
  experts and the vocabulary (embedding, LM head) are split `tp` ways. The W/tp groups are replicas.
- Routed experts are spread over all W ranks: `ep` expert groups of E/ep experts each; inside an
  expert group of W/ep ranks, each expert's intermediate dimension is split W/ep ways. So ep = W is
  pure expert parallelism (whole experts per rank) and ep = 1 splits every expert across all ranks;
  either way a rank holds 1/W of the routed experts, which are 97% of DeepSeek-V3's weights.

Data-parallel attention (`dp` > 1, with dp x tp = W): the W/tp tensor-parallel groups are no longer
replicas but each serves its own sequences (its own scheduler, latent cache and batch: the cache and
the batch grow with the ranks instead of being copied). Inside a group everything is as above; only
the routed experts join the groups, exchanging tokens by expert (dsv3.parallel.moe). dp = W is the
layout DeepSeek-V3 is served with at scale (attention, dense layers and the LM head whole on every
rank, the routed experts expert-parallel over all ranks).

`Mesh` is frozen: the layout is fixed when the model is built. Its `comm` carries out the joins;
`LOCAL` (one process) makes each the identity, and dsv3.parallel.mesh implements them over
torch.distributed process groups. The model imports this module only, never dsv3.parallel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class Collectives(Protocol):
    """The joins between slices that the model's forward calls."""
    distributed: bool      # False: one process, every join the identity
    tensor_parallel: bool  # True when tp-split tensors must be joined (a tensor-parallel group exists)

    def tp_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the tensor-parallel group (row-parallel outputs: o_proj, down_proj); in place."""

    def gather_vocab(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        """[T, V/tp] per rank -> [T, V] on every rank (vocab-parallel LM head)."""

    def routed_experts(self, mesh: "Mesh", x: torch.Tensor, gate, experts_op, weights, layer: int) -> torch.Tensor:
        """The routed-expert part of a MoE layer across ranks, summed: [T, D]."""

    # data-parallel attention only (dp > 1; dsv3.parallel.mesh.ProcessGroups)
    def next_exchange(self) -> tuple[int, int] | None:
        """(MoE layer, most rows) another group is at, or None once every group is done."""

    def join_routed_experts(self, mesh: "Mesh", x_empty: torch.Tensor, most: int, gate, experts_op, weights) -> None:
        """Take part in one MoE layer's exchange with zero rows of one's own."""

    def any_rank(self, flag: bool) -> bool:
        """`flag` or-ed over all ranks."""


class _Local:
    distributed = False
    tensor_parallel = False

    def tp_reduce(self, x):
        return x

    def gather_vocab(self, logits, vocab):
        return logits

    def routed_experts(self, mesh, x, gate, experts_op, weights, layer):
        raise AssertionError("one process holds every expert: the model calls moe_experts directly")


LOCAL = _Local()


@dataclass(frozen=True)
class Mesh:
    """One rank's place among the W = world ranks, and (in `comm`) the collectives that join them."""
    world: int = 1
    rank: int = 0
    tp: int = 1
    ep: int = 1
    dp: int = 1        # data-parallel attention groups (each of tp ranks); 1: every group is a replica
    comm: Collectives = field(default=LOCAL, repr=False, compare=False)

    def __post_init__(self):
        if self.world % self.tp or self.world % self.ep:
            raise ValueError(f"tp={self.tp} and ep={self.ep} must divide the world size {self.world}")
        if self.dp > 1 and self.dp * self.tp != self.world:
            raise ValueError(f"dp={self.dp} x tp={self.tp} must equal the world size {self.world}")

    @property
    def distributed(self) -> bool:
        return self.comm.distributed

    @property
    def tensor_parallel(self) -> bool:
        """True when tp-split tensors must be joined (tp > 1, or a one-rank group under torchrun)."""
        return self.comm.tensor_parallel

    # -- layout --------------------------------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def data_parallel(self) -> bool:
        """True when the tensor-parallel groups serve different sequences (dp > 1)."""
        return self.dp > 1

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel group (0 when dp == 1: all groups are one replica set)."""
        return self.rank // self.tp if self.dp > 1 else 0

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

    # -- the joins (see Collectives) -----------------------------------------------------------------
    def tp_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.tp_reduce(x)

    def gather_vocab(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        return self.comm.gather_vocab(logits, vocab)

    def routed_experts(self, x: torch.Tensor, gate, experts_op, weights, layer: int = 0) -> torch.Tensor:
        return self.comm.routed_experts(self, x, gate, experts_op, weights, layer)


SINGLE = Mesh()   # one process: every slice is the whole, every collective the identity
