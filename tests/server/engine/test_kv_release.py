"""KV slabs grown for a long sequence are given back once no sequence runs (issue 12:
RSS doubled after hostile traffic because they were kept for the process lifetime)."""
from __future__ import annotations

import torch

from adapterctl.server.engine.kv import KVCache


def test_grown_positions_are_released_when_idle_only():
    kv = KVCache(num_layers=2, kv_heads=1, head_dim=8, max_rows=4, max_positions=4096, dtype=torch.float32,
                 device=torch.device("cpu"), pos_block=256)
    small = kv.nbytes()
    short = kv.alloc_row(100)
    long = kv.alloc_row(3000)
    assert kv.pos_capacity >= 3000 and kv.nbytes() >= 8 * small
    kv.k[0][short, :, :4] = 7.0
    kv.lengths[short] = 4
    kv.free_row(long)
    assert not kv.release_idle()  # a sequence still runs: its rows stay where they are
    assert kv.pos_capacity >= 3000 and torch.all(kv.k[0][short, :, :4] == 7.0)
    kv.free_row(short)
    assert kv.release_idle()
    assert kv.pos_capacity == 256 and kv.nbytes() == small and kv.row_capacity == 4
    assert not kv.release_idle()  # nothing more to give back
    row = kv.alloc_row(1000)  # and it grows again on demand
    assert row == 0 and kv.pos_capacity >= 1000


def test_idle_trimmer_trims_once_per_busy_period():
    from adapterctl.server.engine.heap import IdleTrimmer

    now = [0.0]
    trimmer = IdleTrimmer(min_interval_s=5.0, clock=lambda: now[0])
    assert trimmer._trim is not None  # glibc (the CI image); elsewhere trimming is a no-op
    assert not trimmer.idle()  # nothing ran yet
    trimmer.stepped()
    assert trimmer.idle() and trimmer.trims == 1
    assert not trimmer.idle()  # still idle: nothing new to give back
    trimmer.stepped()
    now[0] = 1.0
    assert not trimmer.idle()  # rate-limited
    now[0] = 6.0
    assert trimmer.idle() and trimmer.trims == 2
    now[0] = 20.0
    assert trimmer.idle(force=True) and trimmer.trims == 3  # after the KV slabs were released
