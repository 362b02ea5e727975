"""Prefix cache: output identical with and without it (tokens, and logits within 1e-6 in
fp32) for base rows and adapters, prompts sharing a system prompt longer than the
sliding window; no hit across adapter digests (a same-name reload); LRU eviction under
the byte budget; restored K/V survive KV-row compaction."""
from __future__ import annotations

import hashlib
import random
from array import array

import pytest
import torch

from adapterctl.server.engine.kv import KVCache
from adapterctl.server.engine.prefix import PrefixCache, block_keys
from adapterctl.server.types import ServedAdapter

BLOCK = 16
MAX_NEW = 8
rng = random.Random(11)
SYSTEM = [2] + [rng.randrange(3, 5000) for _ in range(99)]  # 100 tokens: > sliding window (64), 6 whole blocks
SUFFIXES = [[rng.randrange(3, 5000) for _ in range(n)] for n in (7, 21, 1)]


def _served(name: str, digest_byte: str) -> ServedAdapter:
    return ServedAdapter(name, 1, "sha256:" + digest_byte * 64)


def test_block_keys_chain_the_prefix_and_the_weights():
    tokens = list(range(100, 148))  # 3 blocks
    keys = block_keys("adapter:sha256:aa", tokens, BLOCK, 3)
    root = hashlib.sha256(b"adapter:sha256:aa").digest()
    first = hashlib.sha256(root + array("q", tokens[:BLOCK]).tobytes()).digest()
    assert keys[0] == first and len(set(keys)) == 3
    changed = tokens[:20] + [7] + tokens[21:]  # a token of block 1 differs
    other = block_keys("adapter:sha256:aa", changed, BLOCK, 3)
    assert other[0] == keys[0] and other[1] != keys[1] and other[2] != keys[2]  # block 2 differs via its parent
    assert not set(block_keys("adapter:sha256:bb", tokens, BLOCK, 3)) & set(keys)
    assert not set(block_keys("base:sha256:aa", tokens, BLOCK, 3)) & set(keys)


def _kv(rows: int = 4) -> KVCache:
    return KVCache(num_layers=2, kv_heads=1, head_dim=4, max_rows=rows, max_positions=128, dtype=torch.float32,
                   device=torch.device("cpu"))


def _fill(kv: KVCache, row: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in (*kv.k, *kv.v):
        t[row, :, :n] = torch.randn(t[row, :, :n].shape, generator=g)
    kv.lengths[row] = n


def test_restore_copies_whole_blocks_and_keeps_the_last_token():
    kv, cache = _kv(), PrefixCache(1 << 20, BLOCK, "sha256:base")
    prompt = list(range(3, 3 + 2 * BLOCK))  # exactly 2 blocks
    src = kv.alloc_row(64)
    _fill(kv, src, len(prompt), seed=1)
    assert cache.store(None, prompt, kv, src) == 2
    assert cache.store(None, prompt, kv, src) == 0  # already cached
    dst = kv.alloc_row(64)
    # only 1 block lies inside prompt[:-1]: the last token must be recomputed for logits
    assert cache.restore(None, prompt, kv, dst) == BLOCK
    assert cache.restore(None, prompt + [9], kv, dst) == 2 * BLOCK
    for t in (*kv.k, *kv.v):
        assert torch.equal(t[dst, :, :2 * BLOCK], t[src, :, :2 * BLOCK])
    assert kv.lengths[dst] == 2 * BLOCK
    assert cache.restore(_served("a", "1"), prompt + [9], kv, dst) == 0  # other weights: miss
    assert cache.hit_tokens == 3 * BLOCK


def test_restored_prefix_survives_row_compaction():
    """A row restored at admission, before any prefill chunk ran, is moved by free_row
    with its restored positions (its length is set at restore)."""
    kv, cache = _kv(), PrefixCache(1 << 20, BLOCK, "sha256:base")
    prompt = list(range(3, 3 + 3 * BLOCK + 5))
    a = kv.alloc_row(64)
    _fill(kv, a, len(prompt), seed=2)
    cache.store(None, prompt, kv, a)
    want = [t[a, :, :3 * BLOCK].clone() for t in (*kv.k, *kv.v)]
    b = kv.alloc_row(64)
    assert cache.restore(None, prompt, kv, b) == 3 * BLOCK
    assert kv.free_row(a) == b  # b moves into a's place
    for t, w in zip((*kv.k, *kv.v), want):
        assert torch.equal(t[a, :, :3 * BLOCK], w)


def test_eviction_is_lru_under_the_byte_budget():
    kv = _kv()
    block_bytes = 2 * 2 * 1 * BLOCK * 4 * 4  # (k, v) x layers x heads x tokens x head_dim x fp32
    cache = PrefixCache(4 * block_bytes, BLOCK, "sha256:base")
    row = kv.alloc_row(64)
    prompts = [[p] * (2 * BLOCK) + [1] for p in (10, 20, 30)]  # 2 whole blocks each (+1 token recomputed)
    for i, p in enumerate(prompts[:2]):
        _fill(kv, row, len(p), seed=i)
        cache.store(None, p, kv, row)
    assert cache.nbytes == 4 * block_bytes
    other = kv.alloc_row(64)
    assert cache.restore(None, prompts[0], kv, other) == 2 * BLOCK  # prompt 0 becomes most recent
    _fill(kv, row, len(prompts[2]), seed=3)
    assert cache.store(None, prompts[2], kv, row) == 2  # evicts prompt 1's blocks, the least recent
    assert cache.nbytes <= 4 * block_bytes
    assert cache.restore(None, prompts[1], kv, other) == 0
    assert cache.restore(None, prompts[0], kv, other) == 2 * BLOCK
    assert cache.restore(None, prompts[2], kv, other) == 2 * BLOCK
    tiny = PrefixCache(block_bytes - 1, BLOCK, "sha256:base")  # no block fits: stores nothing, no error
    assert tiny.store(None, prompts[0], kv, row) == 0 and tiny.nbytes == 0


def _run_prompts(engine, run, collect, request_for, prompts):
    """Requests one after another (each can reuse the previous prefill), with per-step logits."""
    logits: dict[str, list[torch.Tensor]] = {}
    engine.logits_hook = lambda seqs, rows: [logits.setdefault(s.request.request_id, []).append(r.clone())
                                             for s, r in zip(seqs, rows)]
    results = []
    for i, (adapter, prompt) in enumerate(prompts):
        _, result = run(collect(engine, request_for(prompt, MAX_NEW, adapter, rid=f"q{i}")))
        results.append((result.token_ids, torch.stack(logits[f"q{i}"])))
    return results


@pytest.mark.parametrize("prefill_mode,chunk", [("interleave", BLOCK), ("mixed", 64)])
def test_output_identical_with_and_without_the_cache(prefill_mode, chunk, make_engine, dict_store, run, collect,
                                                     request_for, loaded_adapters):
    """``chunk`` = max_batch_tokens. With chunks of one block, both engines run the very
    same matmuls (restored blocks were computed in the same block-aligned chunks), so the
    logits must be bit-identical. With 64-token chunks the cached prefix was computed in
    other chunk shapes than a cold prefill would use, and fp32 GEMM/SDPA results depend on
    the shape in the last bits: there the bound is 1e-6 relative to the logit scale."""
    prompts = []
    for adapter in (None, "r4-qv", "r16-all-rslora"):
        prompts += [(adapter, SYSTEM + s) for s in SUFFIXES]
    prompts.append(("r4-qv", SYSTEM[:40]))  # shorter than what is cached: hits its 2 whole blocks
    common = dict(prefill_mode=prefill_mode, max_batch_tokens=chunk, max_running_requests=4)
    plain = make_engine(dict_store, prefix_cache_bytes=0, **common)
    cached = make_engine(dict_store, prefix_cache_bytes=1 << 20, prefix_block_tokens=BLOCK, **common)
    assert plain.prefix is None
    want = _run_prompts(plain, run, collect, request_for, prompts)
    got = _run_prompts(cached, run, collect, request_for, prompts)
    worst, scale = 0.0, 0.0
    for i, ((wt, wl), (gt, gl)) in enumerate(zip(want, got)):
        assert gt == wt, f"prompt {i} ({prompts[i][0]}): tokens differ with the prefix cache"
        assert gl.shape == wl.shape
        worst, scale = max(worst, (gl - wl).abs().max().item()), max(scale, wl.abs().max().item())
    print(f"\nprefix cache ({prefill_mode}, chunks of {chunk}): max |logit diff| {worst:.2e} (max |logit| "
          f"{scale:.1f}) over {len(prompts)} prompts, {cached.prefix.hit_tokens} of "
          f"{cached.prefix.lookup_tokens} prompt tokens restored")
    assert worst <= (0.0 if chunk == BLOCK else 1e-6 * scale)
    # per adapter: the 1st prompt misses, the 2nd and 3rd restore the system prompt's 6 whole blocks
    # (the 3rd is SYSTEM + 1 token: 6 blocks lie inside prompt[:-1]); the last one restores 2 blocks
    assert cached.prefix.hit_tokens == 3 * 2 * 6 * BLOCK + 2 * BLOCK
    assert cached.runner.kv.num_rows == 0


def test_same_name_reload_with_other_weights_does_not_hit(make_engine, dict_store, run, collect, request_for,
                                                          peft_dirs, tiny_base):
    """A same-name adapter with another digest (a reload with new weights) never gets the
    old version's K/V: it misses, and its output is that of a cold engine on the new weights."""
    from adapterctl.server.cache.loaded import load_peft_dir
    from adapterctl.server.cache.memory import MemoryStore

    prompt = SYSTEM + SUFFIXES[0]
    engine = make_engine(dict_store, prefix_block_tokens=BLOCK)
    first = _run_prompts(engine, run, collect, request_for, [("r4-qv", prompt)])
    assert engine.prefix.hit_tokens == 0
    reloaded = load_peft_dir(peft_dirs["r8-qkvo"], tiny_base, 64, served=_served("r4-qv", "e"))
    dict_store.adapters["r4-qv"] = reloaded
    second = _run_prompts(engine, run, collect, request_for, [("r4-qv", prompt)])
    assert engine.prefix.hit_tokens == 0, "K/V of the old weights were reused"
    fresh = make_engine(MemoryStore({"r4-qv": reloaded}), prefix_cache_bytes=0)
    cold = _run_prompts(fresh, run, collect, request_for, [("r4-qv", prompt)])
    assert second[0][0] == cold[0][0] != first[0][0]
    third = _run_prompts(engine, run, collect, request_for, [("r4-qv", prompt)])  # the new version's own K/V
    assert engine.prefix.hit_tokens == 6 * BLOCK and third[0][0] == cold[0][0]
