"""The planned decode layer (server/engine/decode_layer.c through decode_layer.py): on the tiny
Gemma 3 in bf16, a layer as one C call writes bitwise the K/V the Python path writes, is no
further from fp32 arithmetic than that path, with adapter tokens too (their LoRA deltas added in
C), re-points itself when the KV cache grows or slot banks are allocated, and steps it does not
take (prompt chunks, too many rows) keep the Python path."""
from __future__ import annotations

import shutil

import pytest
import torch

from adapterctl.server.engine import cpu_build

pytestmark = pytest.mark.skipif(not (cpu_build.avx2_host() and shutil.which("cc")),
                                reason="the planned layer needs Linux x86-64 with AVX2 and a C compiler")

PROMPTS = [[2, 40, 7, 300, 12, 9], [2, 41, 8, 301, 13, 10, 77], [2, 42, 9, 302]]
PROMPTS += [[2, 43 + i, 10 + i, 303 + i, *range(20, 20 + i)] for i in range(6)]  # up to 9 rows


def _runner(tiny_base, dtype="bfloat16", rows=2, max_positions=64, model=None, max_rank=8,
            lora_modules=("q_proj", "v_proj"), **args):
    from adapterctl.basemodel import load_model
    from adapterctl.server.engine.runner import Chunk, ModelRunner

    model = load_model(tiny_base, "cpu", dtype) if model is None else model
    r = ModelRunner(model, max_rows=rows, max_positions=max_positions, num_slots=2,
                    max_rank=max_rank, lora_modules=lora_modules, **args)
    with torch.inference_mode():
        for i in range(rows):
            r.kv.alloc_row(32)
        fwd = r.start([Chunk(i, 0, PROMPTS[i], 0, True) for i in range(rows)])
        while fwd.step():
            pass
    if dtype == "bfloat16" and args.get("planned_layers", True):
        assert r.planned is not None, "bf16 on an AVX2 host with a compiler plans the tiny Gemma's layers"
    return r


def _decode(r, rows, pos, tokens, slot=0):
    """One decode step of ``rows`` rows at ``pos`` (``slot``: one LoRA slot for all, or one per
    row); its logits [rows, vocab]."""
    from adapterctl.server.engine.runner import Chunk

    slots = slot if isinstance(slot, list) else [slot] * rows
    with torch.inference_mode():
        fwd = r.start([Chunk(i, pos[i], [tokens[i]], slots[i], True) for i in range(rows)])
        while fwd.step(whole_head=True):
            pass
    return fwd.logits


def _counting(r):
    calls = []
    run = r.planned.run
    r.planned.run = lambda i, *a: calls.append(i) or run(i, *a)
    return calls


@pytest.mark.parametrize("gemm,rows", [("auto", 2), ("upcast", 2), ("amx", 9)])
def test_a_planned_layer_writes_the_python_paths_kv_and_stays_as_close_to_fp32(tiny_base, gemm, rows, monkeypatch):
    """Teacher-forced decode of the rows for 12 steps: every step's K/V of layer 0 (its inputs
    are the same) is bitwise the Python path's, and the planned logits are no further from fp32
    arithmetic on the same bf16 weights than the Python path's (attention and GELU in C). With
    ``auto``'s GEMM here, with ``kernels.upcast_linear`` (the AVX-512 or AVX2 GEMV's, which
    hosts without native bf16 pick) forced, and on AMX hosts at nine rows, which the planned
    layer's AMX GEMM takes (the GEMV takes 1-4)."""
    from adapterctl.basemodel import load_model
    from adapterctl.server.engine import amx_gemm, cpu_gemv, kernels, runner

    if gemm == "amx" and (amx_gemm.library() is None or not kernels.native_bf16()):
        pytest.skip("no AMX bf16 GEMM here")
    if gemm == "upcast":
        if cpu_gemv.library(cpu_gemv.AVX2) is None:
            pytest.skip("no AVX2 bf16 GEMV here")
        monkeypatch.setattr(runner, "pick_gemm", lambda *a: kernels.upcast_linear)
    planned, python = _runner(tiny_base, rows=rows), _runner(tiny_base, rows=rows, planned_layers=False)
    if gemm == "upcast":
        assert planned.planned.max_rows == min(cpu_gemv.upcast_kernel().max_rows, 256 // planned.num_heads)
    if gemm == "amx":
        assert planned.planned.max_rows == amx_gemm.MAX_ROWS and planned.planned.plan.gemm
    monkeypatch.undo()  # the fp32 reference keeps its own GEMM
    # fp32 arithmetic on the same bf16-rounded weights
    ref = _runner(tiny_base, dtype="float32", rows=rows, model=load_model(tiny_base, "cpu", "bfloat16").float())
    calls = _counting(planned)
    err_planned = err_python = 0.0
    for step in range(12):
        pos = [len(p) + step for p in PROMPTS[:rows]]
        tokens = [100 + 7 * step, 900 + 3 * step, *(200 + 5 * step + 40 * i for i in range(rows - 2))]
        got, want, exact = (_decode(r, rows, pos, tokens) for r in (planned, python, ref))
        for row, p in enumerate(pos):
            assert torch.equal(planned.kv.k[0][row, :, p], python.kv.k[0][row, :, p])
            assert torch.equal(planned.kv.v[0][row, :, p], python.kv.v[0][row, :, p])
        err_planned += float((got.float() - exact).abs().mean())
        err_python += float((want.float() - exact).abs().mean())
    assert calls == [0, 1] * 12  # every layer of every step took the C call
    print(f"mean |logit - fp32|: planned {err_planned / 12:.5f}, python path {err_python / 12:.5f}")
    assert err_planned <= 1.2 * err_python


def _rounded(adapter):
    """``adapter`` (a HostAdapter) with its A and B rounded to bf16, kept in fp32 (the fp32 reference's)."""
    import dataclasses

    weights = {p: (a.bfloat16().float(), b.bfloat16().float()) for p, (a, b) in adapter.weights.items()}
    return dataclasses.replace(adapter, weights=weights)


@pytest.mark.parametrize("slots", [[1, 2], [0, 2]])
def test_adapter_tokens_take_the_planned_layer_with_their_lora_delta(tiny_base, loaded_adapters, slots,
                                                                      monkeypatch):
    """Two rows, each with its slot (1: rank 8 on q/k/v/o; 2: rank 16 on every projection, scale
    1.3; 0: base), written after the plan was built and a base step ran (the banks are allocated
    then, and the plan re-points): every layer of 12 teacher-forced steps takes the C call, layer
    0's K/V are the Python path's but for rare one-ulp roundings of a delta, and the logits are no
    further from fp32 arithmetic (on the same bf16-rounded weights and adapters) than the Python
    path's. The Python path and the reference add their deltas with ATen's ops here (not the CPU
    LoRA kernel the planned layer calls), so the two sides share no LoRA code."""
    import dataclasses

    from adapterctl.basemodel import load_model
    from adapterctl.server.engine import lora_cpu

    # slot 2 with a scale bf16 cannot hold (PEFT scales in fp32; so do both paths)
    adapters = {1: loaded_adapters["r8-qkvo"], 2: dataclasses.replace(loaded_adapters["r16-all-rslora"], scale=1.3)}
    args = dict(max_rank=16, lora_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"))
    planned, python = _runner(tiny_base, **args), _runner(tiny_base, planned_layers=False, **args)
    ref = _runner(tiny_base, dtype="float32", model=load_model(tiny_base, "cpu", "bfloat16").float(), **args)
    monkeypatch.setattr(lora_cpu, "add", lambda *a: False)  # the backends' ATen ops; the plan keeps its kernel
    calls = _counting(planned)
    for r in (planned, python, ref):
        _decode(r, 2, [len(p) for p in PROMPTS[:2]], [5, 6])  # base rows: no bank allocated yet
    assert calls == [0, 1] and all(m.weights is None for m in planned.lora_modules.values())
    for slot, adapter in adapters.items():
        for r in (planned, python):
            r.bank.write(slot, adapter)
        ref.bank.write(slot, _rounded(adapter))
    assert planned.bank.scale[2].item() == torch.tensor(1.3).item()  # fp32, as PEFT scales (bf16 would be 1.296875)
    calls.clear()
    err_planned = err_python = 0.0
    same = total = 0
    for step in range(12):
        pos = [len(p) + 1 + step for p in PROMPTS[:2]]
        tokens = [100 + 7 * step, 900 + 3 * step]
        got, want, exact = (_decode(r, 2, pos, tokens, slots) for r in (planned, python, ref))
        for row, p in enumerate(pos):
            for cache in ("k", "v"):
                a, b = getattr(planned.kv, cache)[0][row, :, p], getattr(python.kv, cache)[0][row, :, p]
                same += int((a == b).sum())
                total += a.numel()
                assert ((a.float() - b.float()).abs() <= b.float().abs() * 2 ** -7 + 1e-6).all()
        err_planned += float((got.float() - exact).abs().mean())
        err_python += float((want.float() - exact).abs().mean())
    assert calls == [0, 1] * 12
    print(f"slots {slots}: layer-0 K/V bitwise the Python path's on {same}/{total}; mean |logit - fp32|: "
          f"planned {err_planned / 12:.5f}, python path {err_python / 12:.5f}")
    assert same >= 0.95 * total
    assert err_planned <= 1.2 * err_python


def test_steps_it_does_not_take_keep_the_python_path(tiny_base):
    """A prompt chunk beside a decode token and more rows than the GEMV takes do not call the
    planned layer; one base row and one adapter row do."""
    from adapterctl.server.engine.runner import Chunk

    r = _runner(tiny_base)
    calls = _counting(r)
    _decode(r, 1, [6], [5])
    assert calls == [0, 1]
    calls.clear()
    _decode(r, 1, [7], [5], slot=1)  # an adapter's decode token (slot 1)
    assert calls == [0, 1]
    calls.clear()
    with torch.inference_mode():  # a prompt chunk rides with a decode row
        r.kv.free_row(1)
        r.kv.alloc_row(32)
        fwd = r.start([Chunk(0, 8, [5], 0, True), Chunk(1, 0, [2, 3, 4], 0, True)])
        while fwd.step():
            pass
    assert calls == []
    many = _runner(tiny_base, rows=2)
    many.planned.max_rows = 1
    calls = _counting(many)
    _decode(many, 2, [6, 7], [5, 6])
    assert calls == []


def test_a_grown_kv_cache_is_written_where_the_python_path_writes(tiny_base):
    """The KV cache re-allocates as a row needs more positions; the plan follows it: the next
    step's K/V land in the new tensors, bitwise the Python path's."""
    planned, python = _runner(tiny_base, rows=3, max_positions=1024), _runner(tiny_base, rows=3, max_positions=1024,
                                                                               planned_layers=False)
    _decode(planned, 1, [6], [5])
    _decode(python, 1, [6], [5])
    before = planned.kv.k[1]
    for r in (planned, python):
        r.kv.free_row(2)
        r.kv.alloc_row(600)  # more positions than the cache holds: it grows (new tensors)
    assert planned.kv.k[1] is not before and planned.kv.pos_capacity >= 600
    calls = _counting(planned)
    _decode(planned, 1, [7], [9])
    _decode(python, 1, [7], [9])
    assert calls == [0, 1]
    for layer in (0, 1):
        assert torch.equal(planned.kv.k[layer][0, :, :8], python.kv.k[layer][0, :, :8])
        assert not planned.kv.k[layer][0, :, 7].eq(0).all()


def test_a_position_outside_the_cache_writes_nothing(tiny_base):
    r = _runner(tiny_base, rows=1)
    kc, vc = r.kv.k[0], r.kv.v[0]
    snapshot = kc.clone(), vc.clone()
    h = torch.randn(1, r.config.hidden_size).bfloat16()
    cos = sin = torch.ones(1, 1, r.head_dim, dtype=torch.bfloat16)
    for row, pos in ((0, kc.shape[2]), (kc.shape[0], 3), (-1, 3)):
        got = r.planned.run(0, h, cos, sin, torch.tensor([row]), torch.tensor([pos]), kc, vc)
        assert got is None
    assert torch.equal(kc, snapshot[0]) and torch.equal(vc, snapshot[1])


def test_the_c_gelu_is_atens_but_for_rare_one_ulp_roundings():
    """``bf16(gelu_tanh(gate)) * up`` in C (its tanh from e^x) against ATen's on gates across
    [-12, 12] and on Gemma-sized rows: bitwise on >= 99.5 %; elsewhere one bf16 ulp apart, or both
    within 1e-6 * |up| of zero (gates near -5, where 1 + tanh cancels and an fp32 ulp of tanh decides)."""
    from adapterctl.server.engine import decode_layer

    lib = decode_layer.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(3)
    for gate_up in (decode_layer.probe_gate_up(), (torch.randn(4, 2 * 2048, generator=gen) * 2).bfloat16()):
        gate, up = gate_up.chunk(2, dim=1)
        want = torch.nn.functional.gelu(gate, approximate="tanh") * up
        got = decode_layer.gelu_mul(lib, gate_up.contiguous())
        same = float((got == want).float().mean())
        print(f"C GELU bitwise ATen's on {same:.5f} of {want.numel()} values")
        assert same >= decode_layer.GELU_AGREEMENT
        near = (got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7
        tail = (got.float().abs() <= 1e-6 * up.float().abs()) & (want.float().abs() <= 1e-6 * up.float().abs())
        assert (near | tail).all()


def test_the_c_fp32_gelu_is_within_a_few_ulps_of_atens():
    """``gelu_tanh(gate) * up`` in fp32 against ATen's, on the probe and on Gemma-sized rows: within
    ``GELU_F32_ERROR`` of ``decode_layer.gelu_f32_error`` (a few fp32 ulps of the product, or of
    1 + tanh where that cancels), mostly bitwise; a GELU off by a factor of two would not pass."""
    from adapterctl.server.engine import decode_layer

    lib = decode_layer.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(4)
    for gate_up in (decode_layer.probe_gate_up().float(), torch.randn(4, 2 * 2048, generator=gen) * 3):
        got = decode_layer.gelu_mul(lib, gate_up.contiguous())
        gate, up = gate_up.chunk(2, dim=1)
        want = torch.nn.functional.gelu(gate, approximate="tanh") * up
        err = decode_layer.gelu_f32_error(got, gate_up)
        print(f"fp32 C GELU: bitwise ATen's on {float((got == want).float().mean()):.4f}, error measure {err:.3f}")
        assert err <= decode_layer.GELU_F32_ERROR
        assert float((got == want).float().mean()) >= 0.8
        assert decode_layer.gelu_f32_error(2 * want, gate_up) > decode_layer.GELU_F32_ERROR


@pytest.mark.parametrize("rows,slots", [(2, [0, 0]), (2, [1, 2]), (9, [0, 0, 0, 1, 1, 1, 2, 2, 2])])
def test_fp32_with_the_panel_gemm_takes_the_planned_layer_close_to_the_python_path(tiny_base, loaded_adapters,
                                                                                     rows, slots):
    """fp32 where the panel GEMM loads (AVX-512F or AVX2): every layer of 12 teacher-forced decode steps
    of two rows, or nine (whose row-wise kernels the layer splits over threads), base or each
    row its adapter (rank 8 on q/k/v/o, rank 16 on every projection), takes
    the C call, writes layer 0's K/V bitwise as the Python path does (the same norm, GEMM, LoRA and
    RoPE kernels), and its logits are within fp32 rounding of that path's (attention and GELU in
    C) with the same argmax."""
    from adapterctl.server.engine import kernels, panel_gemm

    if panel_gemm.library() is None:
        pytest.skip("no panel GEMM here (it needs AVX2 + FMA and a C compiler)")
    args = dict(max_rank=16, lora_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"), dtype="float32")
    planned, python = _runner(tiny_base, rows=rows, **args), _runner(tiny_base, rows=rows, planned_layers=False, **args)
    assert planned.gemm is kernels.panel_linear and planned.planned is not None
    assert planned.planned.max_rows == 256 // planned.num_heads and planned.planned.scratch.dtype == torch.float32
    for slot, name in ((1, "r8-qkvo"), (2, "r16-all-rslora")):
        for r in (planned, python):
            r.bank.write(slot, loaded_adapters[name])
    calls = _counting(planned)
    worst = 0.0
    for step in range(12):
        pos = [len(p) + step for p in PROMPTS[:rows]]
        tokens = [100 + 7 * step + 50 * i for i in range(rows)]
        got, want = (_decode(r, rows, pos, tokens, slots) for r in (planned, python))
        for row, p in enumerate(pos):
            assert torch.equal(planned.kv.k[0][row, :, p], python.kv.k[0][row, :, p])
            assert torch.equal(planned.kv.v[0][row, :, p], python.kv.v[0][row, :, p])
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    assert calls == [0, 1] * 12
    print(f"{rows} rows, slots {slots}: largest |planned - python| logit over the largest |logit|: {worst:.2e}")
    assert worst <= 1e-5


def test_fp32_on_onednn_keeps_the_python_path(tiny_base):
    """The fp32 plan needs the panel GEMM's panels: with ``cpu_gemm="onednn"`` (its blocked
    layout) there is no plan, and decode steps run the Python layers."""
    from adapterctl.server.engine import kernels

    r = _runner(tiny_base, dtype="float32", gemm="onednn")
    assert r.gemm is kernels.onednn_linear and r.planned is None
    _decode(r, 2, [len(p) for p in PROMPTS[:2]], [5, 6])  # steps still run
