"""Arrival counters for kernels whose last program per tile finishes the work (split-K sums, routing).

Each program of a tile adds 1 to the tile's counter after its partial results are stored; the one that
sees `programs - 1` reads every partial (in a fixed order, so results do not depend on timing) and
sets the counter back to 0. The buffer is therefore all zeros between launches: one per device,
allocated once (before any CUDA-graph capture: warm-up calls meet every shape first) and only grown.
Launches on one stream are ordered, so kernels may share it.
"""
import torch

_BUFFERS: dict[torch.device, torch.Tensor] = {}


def tile_counters(device, tiles: int) -> torch.Tensor:
    c = _BUFFERS.get(device)
    if c is None or c.numel() < tiles:
        c = _BUFFERS[device] = torch.zeros(max(4096, tiles), dtype=torch.int32, device=device)
    return c
