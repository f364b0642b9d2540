"""A flat model batch: the tokens of many sequences in one step, with what attention needs.

Sequences whose chunk is marked `decode` (a few new tokens after a cached context: plain decode,
or the [last token + drafts] of speculative verification) come first and use absorbed attention
over the paged cache; the other chunks (prompt prefill, possibly after a cached prefix) follow
and use naive attention over their whole context. Padding is never part of a batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Chunk:
    """New tokens of one sequence for this step."""
    token_ids: list[int]
    start: int              # position of token_ids[0]; tokens before it are already cached
    blocks: list[int]       # the sequence's cache blocks, covering positions < start + len(token_ids)
    decode: bool = False


@dataclass
class Batch:
    input_ids: torch.Tensor            # [T] int64, decode chunks first
    positions: torch.Tensor            # [T] int64
    slots: torch.Tensor                # [T] int64 cache slot each new token is written to
    num_decode_tokens: int
    decode_block_table: torch.Tensor   # [Td, max_blocks] int32 (per decode token)
    decode_context_lens: torch.Tensor  # [Td] int32: keys visible to each decode token (its position + 1)
    cu_seqlens_q: torch.Tensor         # [Bp + 1] int32 over the prefill part's queries
    cu_seqlens_k: torch.Tensor         # [Bp + 1] int32 over prefill_gather_slots
    prefill_gather_slots: torch.Tensor  # [Tk] int64: every cached slot of each prefilling sequence
    token_rows: list[list[int]]        # per chunk (input order): its rows in the flat batch
    # every token's sequence blocks and visible keys (decode rows equal decode_block_table / _context_lens):
    # DeepSeek-V3.2's sparse attention reads the paged cache for prefill tokens too
    block_table: torch.Tensor | None = None     # [T, max_blocks] int32
    context_lens: torch.Tensor | None = None    # [T] int32: position + 1

    @property
    def last_rows(self) -> list[int]:
        return [rows[-1] for rows in self.token_rows]

    @classmethod
    def build(cls, chunks: list[Chunk], block_size: int, device) -> "Batch":
        order = sorted(range(len(chunks)), key=lambda i: not chunks[i].decode)
        ids, pos, slots, rows = [], [], [], [None] * len(chunks)
        dec_tables, dec_lens, cu_q, cu_k, gather, tables, counts = [], [], [0], [0], [], [], []
        max_blocks = max(len(c.blocks) for c in chunks)

        def slot(c: Chunk, p: int) -> int:
            return c.blocks[p // block_size] * block_size + p % block_size

        for i in order:
            c = chunks[i]
            n = len(c.token_ids)
            rows[i] = list(range(len(ids), len(ids) + n))
            ids += c.token_ids
            pos += range(c.start, c.start + n)
            slots += [slot(c, p) for p in range(c.start, c.start + n)]
            padded = c.blocks + [0] * (max_blocks - len(c.blocks))
            tables.append(padded)      # one row per chunk, repeated per token on the device below
            counts.append(n)
            if c.decode:
                dec_tables += [padded] * n
                dec_lens += range(c.start + 1, c.start + n + 1)
            else:
                cu_q.append(cu_q[-1] + n)
                cu_k.append(cu_k[-1] + c.start + n)
                gather += [slot(c, p) for p in range(c.start + n)]
        num_decode = len(dec_lens)

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype, device=device)

        positions = t(pos, torch.int64)
        return cls(
            input_ids=t(ids, torch.int64), positions=positions, slots=t(slots, torch.int64),
            num_decode_tokens=num_decode,
            decode_block_table=t(dec_tables, torch.int32).view(num_decode, max_blocks),
            decode_context_lens=t(dec_lens, torch.int32),
            cu_seqlens_q=t(cu_q, torch.int32), cu_seqlens_k=t(cu_k, torch.int32),
            prefill_gather_slots=t(gather, torch.int64), token_rows=rows,
            block_table=t(tables, torch.int32).repeat_interleave(t(counts, torch.int64), dim=0, output_size=len(ids)),
            context_lens=(positions + 1).to(torch.int32))
