"""The paged latent cache: per layer [num_blocks, block_size, C + R], blocks handed out on demand.

One block holds `block_size` tokens' normed latent (C = 512) and rope key (R = 64) for one layer;
a sequence owns a list of blocks (its block table). The MTP layer has a cache layer of its own.
"""
from __future__ import annotations

import torch

from dsv3.core.errors import RequestError


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RequestError(f"latent cache is full: need {n} more blocks, {len(self._free)} free of "
                               f"{self.num_blocks}; raise kv_cache.max_tokens in the profile or shorten the batch")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class LatentCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, latent_dim: int,
                 dtype: torch.dtype, device):
        self.block_size, self.num_blocks = block_size, num_blocks
        self.layers = [torch.zeros(num_blocks, block_size, latent_dim, dtype=dtype, device=device)
                       for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, blocks: list[int], num_tokens: int) -> None:
        """Extend a sequence's block list in place so it covers `num_tokens` positions."""
        need = self.blocks_needed(num_tokens) - len(blocks)
        if need > 0:
            blocks += self.allocator.allocate(need)
