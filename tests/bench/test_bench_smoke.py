"""``python -m bench.run --quick`` runs end to end on the real Gemma 270M and prints every
key as its last line (the values are machine-dependent; only that the roofline ones were
measured is checked)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
KEYS = {"p1_mixed_over_base", "p2_over_switching", "p3_goodput_over_static", "p3_ttft_p99_over_solo",
        "p4_http_over_inprocess", "p4_grpc_over_inprocess",
        "p5_cold_load_ms_p50", "p5_promote_ms_p50", "p5_zipf_over_hot", "base_tok_s_b64", "p6_train_over_stock",
        "p8_prefix_ttft_gain", "single_stream_tok_s_bf16", "single_adapter_over_base_bf16", "roofline_bf16_b1",
        "roofline_bf16_b64"}
ROOF = ("single_stream_tok_s_bf16", "single_adapter_over_base_bf16", "roofline_bf16_b1", "roofline_bf16_b64")


def test_quick_bench_prints_every_key(gemma_base):
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "bench.run", "--quick"], cwd=repo, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(last) == KEYS
    assert all(last[k] is None or isinstance(last[k], (int, float)) for k in KEYS)
    assert all(isinstance(last[k], float) and last[k] > 0 for k in ROOF)  # measured, not skipped
    table = dict(line.strip().split(" = ", 1) for line in done.stdout.splitlines() if " = " in line)
    assert all(float(table[k]) > 0 for k in ("p5_zipf_first_token_s", "p5_hot_first_token_s"))


def test_gemm_bench_times_the_engine_kernel_against_aten(gemma_base):
    """``bench.gemm_bench`` on the real model's shapes: every shape has a measured speedup,
    and the kernel it names is the one the engine picks for that dtype on this CPU (the C GEMV
    for 8 bf16 rows where it loads, then also timed against the upcast; oneDNN on weights in its
    own layout where the CPU has bf16 arithmetic)."""
    import torch

    from adapterctl.server.engine import cpu_gemv
    from adapterctl.server.engine.kernels import pick_gemm, prepare, upcast_linear

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "bench.gemm_bench", "--rows", "8", "--dtypes", "bfloat16"], cwd=repo,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    shapes = ("qkv", "o", "gate_up", "down", "head")
    assert all(last[f"gemm_speedup_bf16_{s}_b8"] > 0 for s in shapes) and last["gemm_step_ms_bf16_b8"] > 0
    auto = pick_gemm("auto", torch.device("cpu"), torch.bfloat16)
    gemv = auto is upcast_linear and cpu_gemv.library(cpu_gemv.upcast_kernel()) is not None
    probe = torch.ones(16, 16, dtype=torch.bfloat16)
    prepacked = "" if prepare(auto, probe) is probe else "+prepacked"
    kernel = f"cpu_gemv {cpu_gemv.upcast_kernel().name.split()[0]}" if gemv else auto.__name__ + prepacked
    assert all(f" {kernel} " in line for line in done.stderr.splitlines() if line.startswith("bf16 rows"))
    assert all((f"gemm_gemv_over_upcast_bf16_{s}_b8" in last) == gemv for s in shapes)
    avx512 = gemv and cpu_gemv.upcast_kernel() is cpu_gemv.AVX512
    assert all((f"gemm_avx512_over_avx2_bf16_{s}_b8" in last) == avx512 for s in shapes)


def test_gemm_bench_streams_every_layer_through_the_panel_gemm_and_onednn():
    """``gemm_bench.streamed`` (fp32, where ``auto`` is the panel GEMM): one pass over every layer's
    projections, one weight set per layer, timed for both GEMMs; None where ``auto`` is another GEMM."""
    import types

    import torch

    from adapterctl.server.engine.kernels import panel_linear, pick_gemm
    from bench import gemm_bench

    config = types.SimpleNamespace(head_dim=16, num_attention_heads=4, num_key_value_heads=1, hidden_size=64,
                                   intermediate_size=128, num_hidden_layers=3, vocab_size=100)
    got = gemm_bench.streamed(config, rows=5, rounds=1)
    if pick_gemm("auto", torch.device("cpu"), torch.float32) is not panel_linear:
        assert got is None
        return
    assert got is not None and set(got) == {"auto_ms", "onednn_ms"} and all(v > 0 for v in got.values())


def test_gc_bench_forces_collections_on_a_frozen_and_an_unfrozen_engine(gemma_base):
    """``bench.gc_bench`` (one stream per mode) prints each mode's collection time and token gaps
    (machine-dependent: only that both modes were measured is checked)."""
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "bench.gc_bench", "--rounds", "1"], cwd=repo, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    keys = [f"{k}_{mode}" for k in ("gc_full_ms", "itl_max_ms", "itl_p50_ms") for mode in ("frozen", "unfrozen")]
    assert all(isinstance(last[k], float) and last[k] > 0 for k in keys + ["gc_itl_max_unfrozen_over_frozen"])
    assert last["objects_tracked"] > 0
