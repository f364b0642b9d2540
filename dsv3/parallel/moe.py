"""Routed experts across ranks: every token's top-k experts live on other ranks; bring them together.

Rank r holds experts [first, first + E/ep) and, when ep < W, one 1/(W/ep) slice of each one's
intermediate dimension (dsv3.core.layout). The backend's `moe_experts` op computes a rank's share:
it ignores routes to experts the rank does not hold, so its output is the rank's partial sum.

Two ways to sum the partials, chosen by tokens per rank (a Python int: no host sync to decide):

- Sync-free (decode, small batches): every rank routes all T tokens (hidden states are identical
  on every rank, so routing is too), runs its experts, and one all_reduce sums [T, D]. Static
  shapes and no device-to-host copy, so it runs under CUDA graphs.
- Dispatch / combine (prefill, large batches): rank r owns a token shard (T/W rows), routes only
  those, sends each token once to every rank holding one of its experts, with its top-k ids and
  weights (all_to_all_single, uneven splits), gets the partial outputs back (all_to_all_single
  again), sums them, and an all_gather rebuilds [T, D] everywhere. The split sizes must be known on
  the host: one small all_to_all of counts and one device-to-host copy per layer, amortised over
  the batch. Gate and expert work are not repeated on any rank.

Data-parallel attention (mesh.dp > 1): each tensor-parallel group holds its own tokens, T_g rows,
so the groups first agree, per MoE layer, on the largest T_g (one all_reduce of three integers,
which also carries the layer: a group with no tokens for this forward, or done with its step,
joins the layer other groups are at with zero rows, since its experts may be the ones their
tokens need; see DeepseekV3.join_other_groups). Then, by that agreed size:

- Sync-free: each group's rows padded to the agreed size are all-gathered (each of the group's tp
  ranks sends 1/tp of them), every rank routes and runs its experts over all groups' rows, one
  all_reduce sums them, and each group keeps its own.
- Dispatch / combine: as above, with the group's rows sharded over its tp ranks (not the world),
  and the all_gather over the group only.
"""
from __future__ import annotations

import torch

from dsv3.core.ops import ExpertWeights


def split_sizes(n: int, parts: int) -> list[int]:
    """n tokens over `parts` ranks as torch.tensor_split does: the first n % parts get one more."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def routed_experts(mesh, comm, x: torch.Tensor, gate, experts_op, weights: ExpertWeights,
                   layer: int = 0) -> torch.Tensor:
    """x [T, D], identical on every rank -> sum_k w_k expert_k(x) [T, D], identical on every rank.
    Under data-parallel attention x is this group's rows (T differs by group; T = 0 when the group
    only joins) and so is the result. mesh: the layout (dsv3.core.layout.Mesh); comm: its
    process-group collectives; layer: the MoE layer's index (the groups check they agree on it)."""
    if mesh.data_parallel:
        most = comm.agree_exchange(x.shape[0], layer)
        return exchange_across_groups(mesh, comm, x, most, gate, experts_op, weights)
    sizes = split_sizes(x.shape[0], mesh.world)
    if sizes[0] <= comm.sync_free_max_tokens:
        return _sync_free(comm, x, gate, experts_op, weights)
    xs = x[sum(sizes[:mesh.rank]): sum(sizes[:mesh.rank + 1])]             # [Ts, D] this rank's token shard
    return comm.gather_rows(_dispatch_combine(mesh, comm, xs, gate, experts_op, weights), sizes)


def exchange_across_groups(mesh, comm, x, most: int, gate, experts_op, weights) -> torch.Tensor:
    """Data-parallel attention: this group's rows x [T_g, D] (T_g <= most, the largest over groups,
    already agreed) -> their routed-expert outputs [T_g, D]."""
    if most <= comm.sync_free_max_tokens:
        return _sync_free_groups(mesh, comm, x, most, gate, experts_op, weights)
    sizes = split_sizes(x.shape[0], mesh.tp)                                # the group's rows over its tp ranks
    j = mesh.tp_rank
    ys = _dispatch_combine(mesh, comm, x[sum(sizes[:j]): sum(sizes[:j + 1])], gate, experts_op, weights)
    return comm.gather_rows(ys, sizes, within_group=True) if mesh.tp > 1 else ys


def _sync_free_groups(mesh, comm, x, most, gate, experts_op, weights):
    # each group's rows padded to the agreed size (a multiple of tp; zero rows add 0), and since a group's
    # tp ranks hold the same rows, each sends its 1/tp of them: the gather is every group's rows once
    per = -(-most // mesh.tp)
    padded = torch.nn.functional.pad(x, (0, 0, 0, per * mesh.tp - x.shape[0]))          # [tp * per, D]
    j = mesh.tp_rank
    groups = comm.gather_rows(padded[j * per: (j + 1) * per], [per] * mesh.world)    # [dp * tp * per, D]
    topk_w, topk_ids = gate(groups)                                       # routed alike on every rank
    y = comm.world_reduce(experts_op(groups, topk_w, topk_ids, weights))  # [dp * tp * per, D]
    start = mesh.dp_rank * mesh.tp * per
    return y[start: start + x.shape[0]]


def _sync_free(comm, x, gate, experts_op, weights):
    topk_w, topk_ids = gate(x)                                   # [T, k], [T, k]: same on every rank
    y = experts_op(x, topk_w, topk_ids, weights)                 # [T, D]: this rank's experts only
    return comm.world_reduce(y)


def _dispatch_combine(mesh, comm, xs, gate, experts_op, weights):
    """This rank's token shard xs [Ts, D] (Ts may be 0) -> its routed-expert outputs [Ts, D]."""
    world = mesh.world
    if xs.shape[0]:
        topk_w, topk_ids = gate(xs)                              # [Ts, k]
    else:                                                        # nothing to route; still join the exchange
        k = gate.spec.top_k
        topk_w = torch.zeros(0, k, dtype=torch.float32, device=xs.device)
        topk_ids = torch.zeros(0, k, dtype=torch.long, device=xs.device)
    per_group = weights.gate.data.shape[0]                       # experts per expert group (E / ep)
    # destinations: expert group g is held (sliced W/ep ways) by ranks g*W/ep .. (g+1)*W/ep - 1
    visits = torch.zeros(xs.shape[0], mesh.ep, dtype=torch.bool, device=xs.device)
    visits.scatter_(1, topk_ids // per_group, True)              # [Ts, ep] groups each token visits
    dest = visits.repeat_interleave(mesh.moe_tp, dim=1)          # [Ts, W] ranks each token goes to
    to_rank, token = dest.t().nonzero(as_tuple=True)             # routes sorted by rank, then token
    send_counts = dest.sum(0)                                    # [W]
    recv_counts = comm.all_to_all(send_counts, [1] * world, [1] * world, "all_to_all of MoE dispatch counts")
    send_sizes, recv_sizes = send_counts.tolist(), recv_counts.tolist()   # the host sync of this path

    # dispatch: each token once per destination rank, with its top-k weights and ids (ids < 2^24 are
    # exact in float32, so one message carries both)
    meta = torch.cat((topk_w.float(), topk_ids.float()), dim=1)[token]               # [N, 2k]
    recv_x = comm.all_to_all(xs[token], send_sizes, recv_sizes, "all_to_all of MoE dispatch (tokens)")
    recv_meta = comm.all_to_all(meta, send_sizes, recv_sizes, "all_to_all of MoE dispatch (routes)")
    k = topk_ids.shape[1]
    y = experts_op(recv_x, recv_meta[:, :k], recv_meta[:, k:].long(), weights)      # [N', D] partial sums

    # combine: partial outputs back to the token's owner, summed there in float32
    back = comm.all_to_all(y, recv_sizes, send_sizes, "all_to_all of MoE combine")   # [N, D]
    ys = torch.zeros(xs.shape, dtype=torch.float32, device=xs.device).index_add_(0, token, back.float())
    return ys.to(xs.dtype)
