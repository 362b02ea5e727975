"""Prefix cache: K/V of whole prompt blocks, kept after a prefill and copied into the
row of a later prompt that starts with the same tokens on the same weights.

Key of block ``i`` of a prompt = ``sha256(key of block i-1 || tokens of block i)``,
the chain rooted at ``sha256(namespace)``; the namespace is the adapter's manifest
digest (``adapter:sha256:…``) or the base model's fingerprint for base rows. So a key
names the whole prefix up to its block *and* the exact weights that produced it:
every LoRA-targeted layer changes the hidden states feeding later layers' K/V, so K/V
is never shared across adapters, and a same-name reload with other weights (another
digest) can never be served K/V of the old ones.

Invariants:
  * only whole blocks of ``block_tokens`` are cached; a lookup uses at most the blocks
    inside ``prompt[:-1]``, so the last prompt token is always recomputed (its logits
    give the first sampled token);
  * a cached block holds positions ``i*B .. (i+1)*B-1`` of *every* layer, sliding-window
    layers included (the KV row keeps all positions), so copying a prefix back gives
    exactly the cache state a full prefill would have written;
  * the byte budget is one :class:`~adapterctl.server.lru.LRUCache`; a hit touches the
    chain leaf-first, so the root is the most recent and blocks are evicted leaf-first.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

import torch

from adapterctl.errors import ResourceExhausted
from adapterctl.server.engine.kv import KVCache
from adapterctl.server.lru import LRUCache
from adapterctl.server.types import EngineObserver, ServedAdapter


@dataclass(frozen=True)
class KVBlock:
    """One block's K/V over all layers."""

    k: torch.Tensor  # [num_layers, kv_heads, block_tokens, head_dim]
    v: torch.Tensor  # [num_layers, kv_heads, block_tokens, head_dim]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def block_keys(namespace: str, tokens: list[int], block_tokens: int, num_blocks: int) -> list[bytes]:
    """Chain keys of the first ``num_blocks`` whole blocks of ``tokens`` (see module docstring)."""
    key = hashlib.sha256(namespace.encode()).digest()
    keys = []
    for i in range(num_blocks):
        block = array("q", tokens[i * block_tokens: (i + 1) * block_tokens])
        key = hashlib.sha256(key + block.tobytes()).digest()
        keys.append(key)
    return keys


class PrefixCache:
    """Block K/V keyed by (weights, token prefix), bounded in bytes (LRU). Decode thread only."""

    def __init__(self, max_bytes: int, block_tokens: int, base_key: str,
                 observer: EngineObserver | None = None) -> None:
        self.block_tokens = block_tokens
        self.base_key = base_key
        self.observer = observer or EngineObserver()
        self.lru: LRUCache[bytes, KVBlock] = LRUCache(max_bytes=max_bytes, sizeof=lambda b: b.nbytes)
        self.hit_tokens = 0  # prompt tokens restored instead of prefilled
        self.lookup_tokens = 0  # prompt tokens looked up (hit + missed)

    def namespace(self, served: ServedAdapter | None) -> str:
        """What the K/V depend on besides the tokens: the adapter digest or the base fingerprint."""
        return f"base:{self.base_key}" if served is None else f"adapter:{served.digest}"

    def restore(self, served: ServedAdapter | None, prompt: list[int], kv: KVCache, row: int) -> int:
        """Copy the longest cached block prefix of ``prompt[:-1]`` into the (fresh) ``row``
        and return its length in tokens (0 on a miss); the row's length is set to it."""
        B = self.block_tokens
        keys = block_keys(self.namespace(served), prompt, B, (len(prompt) - 1) // B)
        found: list[KVBlock] = []
        for key in keys:
            block = self.lru.peek(key)
            if block is None:
                break
            found.append(block)
        for key in reversed(keys[: len(found)]):  # leaf first: the root ends most recent
            self.lru.get(key)
        n = len(found) * B
        self.lookup_tokens += len(prompt)
        self.hit_tokens += n
        if found:
            k = torch.cat([b.k for b in found], dim=2)  # [layers, kv_heads, n, head_dim]
            v = torch.cat([b.v for b in found], dim=2)
            for layer in range(kv.num_layers):
                kv.k[layer][row, :, :n].copy_(k[layer])
                kv.v[layer][row, :, :n].copy_(v[layer])
        kv.lengths[row] = n
        self.observer.on_prefix_cache(n, len(prompt), self.lru.nbytes)
        return n

    def store(self, served: ServedAdapter | None, prompt: list[int], kv: KVCache, row: int) -> int:
        """Copy ``prompt``'s whole blocks that are not cached yet out of ``row`` (its prefill
        is complete); returns how many were added. Stops quietly at the budget."""
        B = self.block_tokens
        keys = block_keys(self.namespace(served), prompt, B, len(prompt) // B)
        added = 0
        for i, key in enumerate(keys):
            if key in self.lru:
                continue
            lo, hi = i * B, (i + 1) * B
            block = KVBlock(torch.stack([kv.k[layer][row, :, lo:hi] for layer in range(kv.num_layers)]),
                            torch.stack([kv.v[layer][row, :, lo:hi] for layer in range(kv.num_layers)]))
            try:
                self.lru.put(key, block)
            except ResourceExhausted:  # one block is larger than the whole budget
                break
            added += 1
        for key in reversed(keys):
            self.lru.get(key)
        return added

    @property
    def nbytes(self) -> int:
        return self.lru.nbytes
