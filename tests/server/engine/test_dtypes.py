"""``--dtype auto``: the resolution rule fed with CPU flags / CUDA capability, the
/proc/cpuinfo parser, and the engine serving in the dtype it resolved."""
from __future__ import annotations

import logging

import pytest

from adapterctl.server.engine.dtypes import cpu_flags, resolve_dtype


@pytest.mark.parametrize("device,flags,cuda_bf16,want", [
    ("cpu", {"avx2", "fma"}, None, "float32"),  # AMD EPYC / older Xeon: no native bf16
    ("cpu", {"avx2", "avx512f", "avx512_bf16"}, None, "bfloat16"),
    ("cpu", {"avx2", "amx_tile", "amx_bf16"}, None, "bfloat16"),
    ("cpu", set(), None, "float32"),
    ("cuda", set(), True, "bfloat16"),
    ("cuda:1", set(), True, "bfloat16"),
    ("cuda", {"amx_bf16"}, False, "float32"),  # host CPU flags do not matter for a CUDA device
    ("mps", {"amx_bf16"}, True, "float32"),
])
def test_auto_picks_bf16_only_with_native_support(device, flags, cuda_bf16, want):
    dtype, why = resolve_dtype("auto", device, flags=flags, cuda_bf16=cuda_bf16)
    assert dtype == want
    assert why.startswith("auto: ")
    if device == "cpu" and want == "bfloat16":
        assert any(f in why for f in flags if "bf16" in f)  # the log line names the flag that decided


@pytest.mark.parametrize("explicit", ["float32", "bfloat16", "float16"])
def test_explicit_dtype_is_kept(explicit):
    assert resolve_dtype(explicit, "cpu", flags={"amx_bf16"}) == (explicit, "set explicitly")
    assert resolve_dtype(explicit, "cuda", cuda_bf16=False)[0] == explicit


def test_cpu_flags_parses_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 amx_bf16 avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_engine_serves_in_the_resolved_dtype(make_engine, caplog):
    """``dtype=auto`` (the EngineConfig default) on this host: the model, KV cache and slot
    bank use what :func:`resolve_dtype` picks here, and one log line says why."""
    import torch

    want, why = resolve_dtype("auto", "cpu")
    with caplog.at_level(logging.INFO, logger="adapterctl.server.engine.engine"):
        engine = make_engine(dtype="auto")
    assert engine.dtype == want
    assert engine.runner.dtype == engine.runner.kv.dtype == getattr(torch, want)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine dtype")]
    assert lines == [f"engine dtype {want} ({why}) on cpu"]


def test_default_is_auto_and_serve_accepts_dtypes():
    from adapterctl.errors import InvalidArgument
    from adapterctl.server.engine.config import EngineConfig

    assert EngineConfig().dtype == "auto"
    assert EngineConfig(dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(InvalidArgument, match="dtype"):
        EngineConfig(dtype="int8")


def test_cpu_only_gemm_is_chosen_only_on_cpu():
    """oneDNN is the CPU fast path; on any other device (CUDA) ``auto`` is F.linear, and
    asking for oneDNN there is a clear error rather than a CPU kernel on GPU tensors."""
    import torch

    from adapterctl.server.engine.kernels import pick_gemm, torch_linear

    for dtype in (torch.float32, torch.bfloat16):
        assert pick_gemm("auto", torch.device("cuda"), dtype) is torch_linear
        assert pick_gemm("torch", torch.device("cpu"), dtype) is torch_linear
        with pytest.raises(ValueError, match="oneDNN"):
            pick_gemm("onednn", torch.device("cuda"), dtype)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_auto_gemm_runs_in_every_serving_dtype_on_this_cpu(dtype_name):
    """oneDNN has no bf16 inner product on CPUs without native bf16 (AVX2-only hosts):
    ``auto`` then falls back to F.linear instead of failing every step."""
    import torch

    from adapterctl.server.engine.kernels import pick_gemm

    dtype = getattr(torch, dtype_name)
    x, w, b = torch.randn(3, 16).to(dtype), torch.randn(8, 16).to(dtype), torch.randn(8).to(dtype)
    y = pick_gemm("auto", torch.device("cpu"), dtype)(x, w, b)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), (x.float() @ w.float().T + b.float()), atol=0.1, rtol=0.05)


def _fp32_auto(kernels):
    """fp32 "auto" on this CPU: the panel GEMM where it loads, else oneDNN."""
    return kernels.panel_linear if kernels.panel_gemm.library() is not None else kernels.onednn_linear


def test_bf16_gemm_without_native_bf16_upcasts_weight_blocks_exactly(monkeypatch):
    """On a CPU without native bf16 (:func:`kernels.native_bf16`), ``auto`` picks :func:`upcast_linear` for bf16:
    up to ``max_rows`` rows go to the C GEMV (AVX-512 or AVX2) where it loads; more rows multiply the
    bf16 values in fp32 (bf16 x bf16 products are exact there), block by block over every
    output column, and round once to bf16; without the GEMV, fewer than 8 rows use ATen's."""
    import torch
    import torch.nn.functional as F

    from adapterctl.server.engine import kernels

    native = kernels.small_rows_linear if kernels._small_rows_pay() else kernels.onednn_linear
    want = native if kernels.native_bf16() else kernels.upcast_linear
    assert kernels.pick_gemm("auto", torch.device("cpu"), torch.bfloat16) is want
    assert kernels.pick_gemm("auto", torch.device("cpu"), torch.float32) is _fp32_auto(kernels)
    monkeypatch.setattr(kernels, "UPCAST_BLOCK", 4)  # 11 output rows: blocks of 4, 4 and 3
    # so that 9 and 15 rows take the upcast path
    for name in ("AVX2", "AVX512"):
        monkeypatch.setattr(kernels.cpu_gemv, name, getattr(kernels.cpu_gemv, name)._replace(max_rows=2))
    torch.manual_seed(0)
    w, b = torch.randn(11, 48).bfloat16(), torch.randn(11).bfloat16()
    for shape in ((9, 48), (3, 5, 48)):  # 9 and 15 rows: upcast path
        x = torch.randn(*shape).bfloat16()
        y = kernels.upcast_linear(x, w, b)
        exact = (x.double() @ w.double().T + b.double()).float()
        assert y.dtype == torch.bfloat16 and y.shape == (*shape[:-1], 11)
        assert torch.equal(y.reshape(-1, 11), kernels.upcast_blocks(x.reshape(-1, 48), w, b))
        torch.testing.assert_close(y.float(), exact.bfloat16().float(), atol=1e-6, rtol=2 ** -7)  # <= 1 bf16 ulp
        assert (y.float() == exact.bfloat16().float()).float().mean() > 0.9  # mostly the correctly rounded value
    for rows in (2, kernels.UPCAST_MIN_ROWS - 1):  # the C GEMV where it applies, else ATen's
        few = torch.randn(rows, 48).bfloat16()
        gemv = kernels.cpu_gemv.linear(few, w, b)  # k = 48: the AVX2 GEMV's width, not the AVX-512 one's
        assert kernels.cpu_gemv.linear(few, w, b, kernels.cpu_gemv.AVX512) is None
        assert (gemv is None) == (rows > 2 or kernels.cpu_gemv.library() is None)
        assert torch.equal(kernels.upcast_linear(few, w, b), F.linear(few, w, b) if gemv is None else gemv)


def test_bf16_without_avx512_bf16_or_amx_upcasts_even_where_onednn_emulates_it(monkeypatch):
    """A CPU that lists neither avx512_bf16 nor amx_bf16 gets :func:`upcast_linear` for bf16 from
    ``auto`` and ``gemv`` even where oneDNN runs bf16 (emulated on AVX-512: whole steps measured
    2.0-3.0x slower); an explicit "onednn" still runs it, and fp32 keeps oneDNN. With either flag,
    ``auto`` is oneDNN's (or the small-rows GEMV's)."""
    import torch

    from adapterctl.server.engine import cpu_build, dtypes, kernels

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    real = cpu_build.has_cpu_flag
    monkeypatch.setattr(kernels, "_onednn_runs", lambda dtype: True)  # as on an AVX-512 host
    monkeypatch.setattr(cpu_build, "has_cpu_flag", lambda flag: flag not in dtypes.BF16_CPU_FLAGS and real(flag))
    assert not kernels.native_bf16()
    assert kernels.pick_gemm("auto", cpu, bf16) is kernels.upcast_linear
    assert kernels.pick_gemm("gemv", cpu, bf16) is kernels.upcast_linear
    assert kernels.pick_gemm("onednn", cpu, bf16) is kernels.onednn_linear
    assert kernels.pick_gemm("auto", cpu, torch.float32) is _fp32_auto(kernels)
    monkeypatch.setattr(kernels, "_small_rows_pay", lambda: False)
    for flag in dtypes.BF16_CPU_FLAGS:
        monkeypatch.setattr(cpu_build, "has_cpu_flag", lambda f, flag=flag: f == flag)
        assert kernels.native_bf16()
        assert kernels.pick_gemm("auto", cpu, bf16) is kernels.onednn_linear
    monkeypatch.setattr(kernels, "_onednn_runs", lambda dtype: dtype == torch.float32)  # AVX2: no bf16 at all
    assert not kernels.native_bf16() and kernels.pick_gemm("auto", cpu, bf16) is kernels.upcast_linear
    with pytest.raises(ValueError, match="oneDNN"):
        kernels.pick_gemm("onednn", cpu, bf16)


def test_native_bf16_small_rows_take_the_avx512_gemv_and_more_rows_onednn():
    """Where oneDNN runs bf16 natively and the AVX512-BF16 GEMV loads (no AMX), ``auto`` is
    :func:`small_rows_linear`: its operand keeps the plain weight beside oneDNN's blocked copy
    (:class:`Dual`); 1-4 rows give the C GEMV's result (one bf16 ulp of exact), more rows
    oneDNN's on the blocked copy, and a plain weight (the greedy head's gathered rows) works too."""
    import torch

    from adapterctl.server.engine import cpu_gemv, kernels

    if not (kernels.native_bf16() and kernels._small_rows_pay()):
        assert kernels.pick_gemm("auto", torch.device("cpu"), torch.bfloat16) is not kernels.small_rows_linear
        pytest.skip("needs native bf16 oneDNN with AVX512-BF16 and no AMX")
    assert kernels.pick_gemm("auto", torch.device("cpu"), torch.bfloat16) is kernels.small_rows_linear
    assert kernels.pick_gemm("onednn", torch.device("cpu"), torch.bfloat16) is kernels.onednn_linear
    assert kernels.native(kernels.small_rows_linear) and not kernels.native(kernels.upcast_linear)
    gen = torch.Generator().manual_seed(3)
    w, b = torch.randn(70, 96, generator=gen).bfloat16(), torch.randn(70, generator=gen).bfloat16()
    op = kernels.prepare(kernels.small_rows_linear, w)
    assert isinstance(op, kernels.Dual) and op.plain is w and kernels.plain(op) is w
    assert kernels.prepare(kernels.onednn_linear, w).shape == w.shape  # oneDNN's own: no plain copy
    for rows in (1, 2, 3, 4, 5, 9):
        x = torch.randn(rows, 96, generator=gen).bfloat16()
        y = kernels.small_rows_linear(x, op, b)
        exact = (x.double() @ w.double().T + b.double()).bfloat16()
        torch.testing.assert_close(y.float(), exact.float(), atol=1e-5, rtol=2 ** -7)
        if rows <= cpu_gemv.AVX512_BF16.max_rows:
            assert torch.equal(y, cpu_gemv.linear(x, w, b, cpu_gemv.AVX512_BF16))
        else:
            assert torch.equal(y, kernels.onednn_linear(x, op.packed, b))
        assert torch.equal(kernels.small_rows_linear(x, w, b), y if rows <= 4 else kernels.onednn_linear(x, w, b))
    x3 = torch.randn(2, 3, 96, generator=gen).bfloat16()  # [..., in]
    flat = kernels.small_rows_linear(x3.reshape(6, 96), op, b)
    assert torch.equal(kernels.small_rows_linear(x3, op, b), flat.view(2, 3, 70))


def test_bf16_takes_the_avx512_gemv_on_amx_hosts_too(monkeypatch, tiny_base):
    """Where the CPU reports AMX, ``auto`` and ``cpu_gemm="gemv"`` both pick
    :func:`small_rows_linear` for bf16 (measured faster than oneDNN's AMX GEMM at 1-4 rows), and
    the planned decode layers follow it; fp32 and CUDA get ``auto``'s GEMM; without the
    AVX512-BF16 GEMV, ``auto`` keeps oneDNN and bf16 "gemv" is a clear error."""
    import torch

    from adapterctl.basemodel import load_model
    from adapterctl.server.engine import cpu_build, cpu_gemv, kernels
    from adapterctl.server.engine.runner import ModelRunner

    cpu = torch.device("cpu")
    if not kernels.native_bf16():  # no native bf16: "gemv" is auto's upcast
        assert kernels.pick_gemm("gemv", cpu, torch.bfloat16) is kernels.pick_gemm("auto", cpu, torch.bfloat16)
        pytest.skip("needs native bf16 oneDNN")
    if cpu_gemv.library(cpu_gemv.AVX512_BF16) is None:
        with pytest.raises(ValueError, match="AVX512-BF16"):
            kernels.pick_gemm("gemv", cpu, torch.bfloat16)
        pytest.skip("needs the AVX512-BF16 GEMV")
    real = cpu_build.has_cpu_flag
    monkeypatch.setattr(cpu_build, "has_cpu_flag", lambda flag: flag in ("amx_bf16", "amx_tile") or real(flag))
    assert kernels.pick_gemm("auto", cpu, torch.bfloat16) is kernels.small_rows_linear  # an AMX host's default
    assert kernels.pick_gemm("gemv", cpu, torch.bfloat16) is kernels.small_rows_linear
    assert kernels.pick_gemm("gemv", cpu, torch.float32) is kernels.pick_gemm("auto", cpu, torch.float32)
    assert kernels.pick_gemm("gemv", torch.device("cuda"), torch.bfloat16) is kernels.torch_linear
    args = dict(max_rows=2, max_positions=32, num_slots=1, max_rank=4, lora_modules=("q_proj",))
    for gemm in ("auto", "gemv"):
        runner = ModelRunner(load_model(tiny_base, "cpu", "bfloat16"), gemm=gemm, **args)
        assert runner.gemm is kernels.small_rows_linear and runner.planned is not None
    assert ModelRunner(load_model(tiny_base, "cpu", "bfloat16"), gemm="onednn", **args).planned is None
    monkeypatch.setattr(cpu_gemv, "library", lambda *a: None)
    assert kernels.pick_gemm("auto", cpu, torch.bfloat16) is kernels.onednn_linear
    with pytest.raises(ValueError, match="AVX512-BF16"):
        kernels.pick_gemm("gemv", cpu, torch.bfloat16)
