"""The AMX bf16 GEMM (server/engine/gemm_bf16_amx.c through amx_gemm.py): within a bf16 rounding
of exact sums, each row's result independent of the other rows, a bias added before the
rounding, shapes it does not take refused (None), and kernels.small_rows_linear sending it
exactly the 5-64-row GEMMs. Runs only where the kernel loads (an AMX CPU, a compiler that knows
AMX, Linux granting the tile state)."""
from __future__ import annotations

import pytest
import torch

from adapterctl.server.engine import amx_gemm, kernels

pytestmark = pytest.mark.skipif(amx_gemm.library() is None, reason="the AMX bf16 GEMM does not load here (no AMX)")


def _data(rows, n=96, k=160, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=gen).bfloat16(), (torch.randn(n, k, generator=gen) * 0.1).bfloat16(),
            torch.randn(n, generator=gen).bfloat16())


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 64])
def test_results_are_exact_sums_rounded_once(rows):
    x, w, bias = _data(rows)
    exact = x.double() @ w.double().T + bias.double()
    got = amx_gemm.linear(x, w, bias)
    assert got is not None and got.shape == (rows, 96) and got.dtype == torch.bfloat16
    ulp = exact.abs().clamp_min(1e-30) * 2.0 ** -7  # one bf16 ulp, at most
    assert bool(((got.double() - exact).abs() <= ulp).all())
    same = float((got == exact.bfloat16()).float().mean())  # fp32 sums differ from fp64 only at rounding ties
    print(f"{rows} rows: bitwise the rounded exact sum on {same:.4f}")
    assert same >= 0.98


def test_each_rows_result_does_not_depend_on_the_other_rows():
    x, w, _ = _data(37)
    whole = amx_gemm.linear(x, w)
    for i in (0, 15, 16, 36):
        lo = min(i, 17)  # a 20-row window holding row i, at another place in its groups of 16
        assert torch.equal(whole[i], amx_gemm.linear(x[i:i + 1], w)[0])
        assert torch.equal(whole[i], amx_gemm.linear(x[lo:lo + 20], w)[i - lo])


def test_weight_rows_with_a_longer_stride_read_only_their_columns():
    x, w, _ = _data(9, n=64, k=192)
    view = w[:, :128]  # row stride 192, 128 columns
    assert view.stride() == (192, 1)
    assert torch.equal(amx_gemm.linear(x[:, :128].contiguous(), view), amx_gemm.linear(x[:, :128].contiguous(),
                                                                                        view.contiguous()))


def test_shapes_it_does_not_take_are_refused():
    x, w, _ = _data(8)
    assert amx_gemm.linear(x, w[:80]) is None  # outputs not a multiple of 32
    assert amx_gemm.linear(x[:, :144], w[:, :144].contiguous()) is None  # inputs not a multiple of 32
    assert amx_gemm.linear(x.float(), w.float()) is None
    assert amx_gemm.linear(x[:, :128], w) is None  # widths differ


@pytest.mark.parametrize("rows", [4, 5, 64, 65])
def test_small_rows_linear_sends_it_the_5_to_64_row_gemms(rows, monkeypatch):
    x, w, _ = _data(rows, n=128, k=256)
    operand = kernels.prepare(kernels.small_rows_linear, w)
    calls = []
    real = amx_gemm.linear
    monkeypatch.setattr(amx_gemm, "linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    got = kernels.small_rows_linear(x, operand)
    takes = 4 < rows <= amx_gemm.MAX_ROWS
    assert calls == ([rows] if takes else [])
    if takes:
        assert torch.equal(got, real(x, w))
    assert float((got.float() - x.float() @ w.float().T).abs().max()) < 0.05
