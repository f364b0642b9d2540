"""The paged latent cache: per layer [num_blocks, block_size, C + R], blocks handed out on demand.

One block holds `block_size` tokens' normed latent (C = 512) and rope key (R = 64) for one layer;
a sequence owns a list of blocks (its block table). The MTP layer has a cache layer of its own.

Prefix caching: a block whose every position is computed can be registered under a key that
chains the keys of the blocks before it with its own tokens (sha256, so equal keys mean equal
token prefixes). Another sequence whose prompt starts with the same tokens takes the block
read-only (reference count + 1) instead of recomputing it. A block whose count drops to zero stays
findable ("evictable") until the allocator needs it for something else, oldest first.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from dsv3.core.errors import RequestError


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The prefix-cache key of a block: sha256(parent key, its tokens as int64)."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockAllocator:
    """Reference-counted blocks. Free blocks are either blank or evictable (still holding a
    registered prefix); `allocate` hands out blank ones first, then evicts the least recently freed."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._blank = list(range(num_blocks - 1, -1, -1))       # a stack: allocate pops the lowest id
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0, content registered; oldest first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._blank) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_evictable(self) -> int:
        """Free blocks that still hold a registered prefix."""
        return len(self._evictable)

    @property
    def num_registered(self) -> int:
        return len(self._block_of)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RequestError(f"latent cache is full: need {n} more blocks, {self.num_free} free of "
                               f"{self.num_blocks}; raise kv_cache.max_tokens in the profile or shorten the batch")
        out = []
        for _ in range(n):
            if self._blank:
                b = self._blank.pop()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._block_of[self._key_of.pop(b)]
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        # Last block first: a sequence's tail is the least likely part to be shared again, so it is
        # evicted before its head.
        for b in reversed(blocks):
            self._refs[b] -= 1
            assert self._refs[b] >= 0, f"block {b} freed more often than allocated"
            if self._refs[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    self._blank.append(b)

    # -- prefix caching -----------------------------------------------------------------------------
    def lookup(self, key: bytes) -> int | None:
        return self._block_of.get(key)

    def share(self, block: int) -> None:
        """Take one more reference to a registered block (reviving it if it was evictable)."""
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1

    def register(self, block: int, key: bytes) -> None:
        """Make a fully computed block findable under `key`; the first block with a key keeps it."""
        if block in self._key_of or key in self._block_of:
            return
        self._key_of[block] = key
        self._block_of[key] = block


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

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's contents in every layer (on the device): a fork's own copy of a partial block."""
        for layer in self.layers:
            layer[dst].copy_(layer[src])

    def can_grow(self, blocks: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(blocks) <= self.allocator.num_free
