"""Per-sequence KV cache: one slab per layer, one row per running sequence.

Rows of running sequences are kept dense (``0 .. num_rows-1``; freeing a row moves the
last row into the hole), so a decode step attends over a view ``k[:num_rows, :, lo:hi]``
with no gather. All ``max_rows`` rows are allocated up front (growing them later meant
a multi-second stall copying the whole cache in the middle of traffic); positions
grow on demand, by doubling, up to ``max_positions``, and go back to the first block
when no sequence is running: slabs sized for one long request are
``max_rows x positions x bytes_per_token`` (GBs at 2k positions on Gemma 270M) and were
otherwise kept for the process lifetime (issue 12: RSS 2.4 -> 4.7 GB after hostile traffic).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class KVCache:
    """``k[layer]``, ``v[layer]``: ``[row_capacity, kv_heads, pos_capacity, head_dim]``."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_rows: int, max_positions: int,
                 dtype: torch.dtype, device: torch.device, pos_block: int = 256) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.max_rows, self.max_positions = max_rows, max_positions
        self.dtype, self.device, self.pos_block = dtype, device, pos_block
        self.row_capacity, self.pos_capacity = 0, 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.num_rows = 0
        self.lengths: list[int] = []  # [num_rows] tokens written per row
        self._grow(max_rows, min(pos_block, max_positions))

    def nbytes(self) -> int:
        """Bytes held by the K and V slabs of every layer (capacity, not use)."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def alloc_row(self, max_len: int) -> int:
        """A fresh row for a sequence that will hold at most ``max_len`` tokens."""
        if self.num_rows >= self.max_rows:
            raise RuntimeError("KV rows exhausted (the scheduler admits at most max_running_requests)")
        if max_len > self.max_positions:
            raise RuntimeError(f"sequence of {max_len} tokens exceeds the KV limit {self.max_positions}")
        self._grow(self.num_rows + 1, max_len)
        row = self.num_rows
        self.num_rows += 1
        self.lengths.append(0)
        return row

    def free_row(self, row: int) -> int | None:
        """Release ``row``; returns the row that was moved into it (the old last row) or None."""
        last = self.num_rows - 1
        moved = None
        if row != last:
            n = self.lengths[last]
            for t in (*self.k, *self.v):
                t[row, :, :n].copy_(t[last, :, :n])
            self.lengths[row] = n
            moved = last
        self.lengths.pop()
        self.num_rows -= 1
        return moved

    def release_idle(self) -> bool:
        """With no running rows, shrink the position capacity back to the first block
        (frees the slabs at once: they are mmapped). True when it shrank."""
        first = min(self.pos_block, self.max_positions)
        if self.num_rows or self.pos_capacity <= first:
            return False
        grown = self.nbytes()
        self.k, self.v, self.pos_capacity = [], [], 0  # drop the big slabs before allocating the small ones
        self._grow(self.row_capacity, first)
        log.info("KV cache idle: released %d MiB (back to %d positions)", (grown - self.nbytes()) >> 20, first)
        return True

    def _grow(self, rows: int, positions: int) -> None:
        if rows <= self.row_capacity and positions <= self.pos_capacity:
            return
        new_rows = max(rows, self.row_capacity)
        new_pos = self.pos_capacity
        while new_pos < positions:
            new_pos = min(self.max_positions, max(self.pos_block, 2 * new_pos))
        shape = (new_rows, self.kv_heads, new_pos, self.head_dim)
        old_k, old_v = self.k, self.v
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        if self.num_rows and old_k:
            r, p = self.num_rows, self.pos_capacity
            for new, old in zip((*self.k, *self.v), (*old_k, *old_v)):
                new[:r, :, :p].copy_(old[:r])
        self.row_capacity, self.pos_capacity = new_rows, new_pos
        if new_pos > self.pos_block:
            log.info("KV cache grown to %d positions x %d rows (%d MiB)", new_pos, new_rows, self.nbytes() >> 20)
