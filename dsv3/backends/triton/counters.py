"""Arrival counters for kernels whose last program per tile finishes the work (split-K sums, routing).

Each program of a tile adds 1 to the tile's counter after its partial results are stored; the one that
sees `programs - 1` reads every partial (in a fixed order, so results do not depend on timing) and
sets the counter back to 0. The buffer is therefore all zeros between launches: one per device, only
grown, and an outgrown one is kept (graphs captured with it still use it). Launches that need no
counters (no split-K) do not ask for them, so only small-M launches size the buffer.
Launches on one stream are ordered, so kernels may share it.
"""
import torch

_BUFFERS: dict[torch.device, torch.Tensor] = {}
# Buffers outgrown by a larger launch. A CUDA graph captured earlier holds the address of the buffer it
# was captured with: freeing it would hand that memory to other tensors, and the graph's last-program
# checks would then read garbage (issue 18's batch-invariant run: a long prefill grew the buffer after
# the small decode buckets were captured, and their split-K GEMMs went wrong). Kept, they stay valid
# and all zeros, as every launch leaves them.
_OUTGROWN: list[torch.Tensor] = []


def tile_counters(device, tiles: int) -> torch.Tensor:
    c = _BUFFERS.get(device)
    if c is None or c.numel() < tiles:
        if c is not None:
            _OUTGROWN.append(c)
        c = _BUFFERS[device] = torch.zeros(max(4096, 2 * tiles), dtype=torch.int32, device=device)
    return c
