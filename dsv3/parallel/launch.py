"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    torchrun --nproc-per-node 8 --no-python dsv3-run --model DIR --backend cuda --prompt "Hello"
    torchrun --nnodes 2 --node-rank $NODE --master-addr $HEAD --master-port 29500 --nproc-per-node 8 \\
        --no-python dsv3-run --model DIR --backend cuda --tp 16 --ep 16 --prompt "Hello"

One process per rank; each builds the same model slice plan, loads only its slice, and runs the same
schedule. The collective library is the backend's (`dsv3_distributed_backend`: nccl on CUDA and
ROCm, hccl on Ascend, gloo on the CPU). DSV3_DIST_TIMEOUT (seconds, default 600) bounds how long a
collective waits for its peers: a rank that dies or stalls ends the run on every rank with an error.
"""
from __future__ import annotations

import atexit
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from dsv3.core.errors import ProfileError
from dsv3.parallel.mesh import SINGLE, Mesh, process_mesh
from dsv3.parallel.sharding import dp_layout

TIMEOUT_ENV = "DSV3_DIST_TIMEOUT"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "600")
    try:
        seconds = float(raw)
    except ValueError:
        raise ProfileError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise ProfileError(f"{TIMEOUT_ENV}={raw!r}: must be > 0 seconds")
    return timedelta(seconds=seconds)


def rank_device(device: torch.device, local_rank: int, local_world: int) -> torch.device:
    """cuda -> cuda:LOCAL_RANK (and make it current: NCCL uses the current device); cpu stays cpu."""
    if device.type == "cpu":
        return device
    if device.index is not None and local_world > 1:
        raise ProfileError(f"device {device} is fixed, but {local_world} ranks share this node and each needs "
                           f"its own; leave the index out (device: {device.type}) and rank r uses {device.type}:r")
    if device.index is None:
        device = torch.device(device.type, local_rank)
    torch.get_device_module(device.type).set_device(device)
    return device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def setup(profile, registry, backend_name: str, device: torch.device) -> tuple[Mesh, torch.device]:
    """This process's mesh and device. Without torchrun: SINGLE. Under torchrun (RANK set; any
    WORLD_SIZE, 1 included, so one GPU exercises the collective path): joins the default process
    group (or reuses one already made), builds the tensor-parallel groups, and seeds torch's global
    generator alike on every rank (unseeded sampling then agrees across ranks)."""
    world, tp, ep, dp = world_size(), profile.parallel.tp, profile.parallel.ep, profile.parallel.dp
    if world == 1 and "RANK" not in os.environ:   # plain `python` / `dsv3-run`: no process group
        if tp > 1 or ep > 1 or dp > 1:
            raise ProfileError(f"{profile.source}: parallel = {{tp: {tp}, ep: {ep}, dp: {dp}}} needs several processes; "
                               f"launch with torchrun --nproc-per-node N --no-python dsv3-run ... (N a multiple of "
                               f"{max(tp, ep, dp)})")
        return SINGLE, device
    if dp > 1:   # data-parallel attention: dp groups of tp ranks; routed experts over all ranks unless set
        tp, ep = dp_layout(world, dp, tp, ep)
        if dp * tp != world:
            raise ProfileError(f"{profile.source}: parallel = {{dp: {dp}, tp: {tp}}} on {world} processes: dp x tp "
                               f"must equal the number of processes (WORLD_SIZE = {world}); each of the dp groups "
                               f"is tp ranks (e.g. dp: {world}, tp: 1, or dp: {max(world // 2, 1)}, tp: 2)")
    elif tp == 1 and ep == 1:   # not set: split everything across all ranks, as the official demo does
        tp = ep = world
    if world % tp or world % ep:
        raise ProfileError(f"{profile.source}: parallel = {{tp: {tp}, ep: {ep}}} on {world} processes: tp and ep "
                           f"must each divide the number of processes (WORLD_SIZE = {world})")
    collective = registry.pm.hook.dsv3_distributed_backend(backend=backend_name)
    if collective is None:
        raise ProfileError(f"backend {backend_name!r} names no torch.distributed backend (its plugin implements no "
                           f"dsv3_distributed_backend hook), so it cannot run on {world} processes")
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise ProfileError("WORLD_SIZE > 1 but RANK is not set; launch with torchrun, which sets RANK, "
                           "LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each process") from None
    device = rank_device(device, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    limit = timeout()
    if not dist.is_initialized():
        dist.init_process_group(collective, rank=rank, world_size=world, timeout=limit)
        # tear down before the interpreter does: gloo's threads otherwise race static destruction at
        # exit and abort the process ("terminate called without an active exception")
        atexit.register(_destroy)
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise ProfileError(f"a process group of {dist.get_world_size()} ranks already exists here, but WORLD_SIZE "
                           f"is {world}")
    # tensor-parallel groups of tp consecutive ranks; every rank creates every group, in the same order.
    # tp == 1 < world: attention is whole on every rank and needs no group.
    tp_group = dist.group.WORLD if tp == world else None
    if 1 < tp < world:
        for first in range(0, world, tp):
            group = dist.new_group(list(range(first, first + tp)), timeout=limit)
            if first <= rank < first + tp:
                tp_group = group
    mesh = process_mesh(world, rank, tp, ep, tp_group=tp_group, world_group=dist.group.WORLD, dp=dp,
                        device=device if collective != "gloo" else "cpu")
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(device)
    mesh.comm.call("broadcast of the sampling seed", dist.broadcast, seed, 0)
    torch.manual_seed(int(seed))
    if rank == 0 and world > 1 and profile.parallel.tp == profile.parallel.ep == profile.parallel.dp == 1:
        print(f"dsv3: {world} processes, parallel = {{tp: {tp}, ep: {ep}}} (set parallel in the profile, or "
              f"--tp/--ep/--dp, to choose)", file=sys.stderr)
    return mesh, device
