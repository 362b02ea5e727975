"""The fp32 panel GEMM (server/engine/gemm_f32_avx512.c or gemm_f32_avx2.c through panel_gemm.py): within
fp32 rounding of exact arithmetic for every register block and ragged shape, bitwise the same for
packed and plain weights and for a row alone or in any batch, refused for what it does not take,
the two kernels bitwise the same where both load, and what ``auto`` gives fp32 runners on CPUs
where one loads."""
from __future__ import annotations

import shutil

import pytest
import torch

from adapterctl.server.engine import cpu_build, kernels, panel_gemm


def _lib():
    if not (cpu_build.avx2_host() and shutil.which("cc") is not None):
        pytest.skip("the kernel needs Linux x86-64 and a C compiler")
    if not cpu_build.has_cpu_flag("fma"):
        assert panel_gemm.library() is None
        pytest.skip("this CPU has no FMA")
    lib = panel_gemm.library()
    assert lib is not None, "the kernel should build and pass its probe on this machine"
    want = panel_gemm.AVX512 if cpu_build.has_cpu_flag("avx512f") else panel_gemm.AVX2
    assert panel_gemm.variant() is want and lib is panel_gemm.build(want)
    return lib


def test_the_avx2_and_avx512_kernels_agree_bitwise():
    """Every kernel that loads on this CPU (both on AVX-512F hosts) gives the same bits for packed and
    plain weights, ragged widths, every register block of either and a row group's edge."""
    _lib()
    libs = [lib for lib in map(panel_gemm.build, panel_gemm.VARIANTS) if lib is not None]
    assert libs and panel_gemm.build(panel_gemm.AVX2) is not None
    gen = torch.Generator().manual_seed(7)
    for n, k in ((17, 150), (70, 640), (96, 64)):
        w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
        panels = panel_gemm.pack(w)
        for rows in (1, 5, 6, 11, 12, 36, 41):
            x = torch.randn(rows, k, generator=gen)
            outs = [panel_gemm._call(lib, x, weight, bias)
                    for lib in libs for weight in (panels, w) for bias in (b, None)]
            for i in range(0, len(outs), 2):
                assert torch.equal(outs[i], outs[0]) and torch.equal(outs[i + 1], outs[1])


@pytest.mark.parametrize("k", [1, 63, 64, 150, 640])
@pytest.mark.parametrize("n", [1, 32, 70])
def test_every_block_and_ragged_shape_is_fp32_close_to_exact(n, k):
    """Row counts through every register block (AVX-512: 12, 8, 4, 2, 1; AVX2: 6, 4, 2, 1) and across a
    row group (36), output
    widths inside one panel and ragged across two, input widths not a multiple of a chunk (64)."""
    _lib()
    gen = torch.Generator().manual_seed(n * 1000 + k)
    w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    panels = panel_gemm.pack(w)
    assert panels.data.shape == (-(-n // 32), k, 32) and panels.shape == (n, k)
    for rows in (1, 2, 3, 7, 12, 13, 31, 36, 37, 80):
        x = torch.randn(rows, k, generator=gen)
        for bias in (None, b):
            want = x.double() @ w.double().T + (0 if bias is None else bias.double())
            got = panel_gemm.linear(x, panels, bias)
            assert got is not None and got.shape == (rows, n)
            torch.testing.assert_close(got.double(), want, atol=1e-4 * k ** 0.5, rtol=1e-5)
            assert torch.equal(got, panel_gemm.linear(x, w, bias))  # the plain layout: bitwise the same


def test_a_row_is_bitwise_the_same_alone_or_in_any_batch():
    """Each output is one sum in input order: a row's result does not depend on the other rows of
    the call, their number, or where in the batch it sits (it fails for a kernel whose sums follow
    its row blocking; ATen's F.linear on a plain weight also fails it here)."""
    _lib()
    gen = torch.Generator().manual_seed(1)
    w = panel_gemm.pack(torch.randn(96, 640, generator=gen))
    row = torch.randn(1, 640, generator=gen)
    alone = panel_gemm.linear(row, w)
    for rows in (2, 5, 12, 24, 36, 40, 64):
        for at in (0, rows // 2, rows - 1):
            x = torch.randn(rows, 640, generator=gen) * 3
            x[at] = row[0]
            assert torch.equal(panel_gemm.linear(x, w)[at], alone[0])


def test_what_it_does_not_take_is_refused_and_panel_linear_falls_back():
    """bf16, a wrong width or bias, or a strided input row: :func:`panel_gemm.linear` says None;
    :func:`kernels.panel_linear` then takes oneDNN (fp32) or ATen (bf16, which oneDNN does not run on
    AVX2-only CPUs) on a plain weight, reshapes [..., in] inputs, copies inputs with a column
    stride, and refuses a mismatched input for its panels."""
    _lib()
    w, b = torch.randn(40, 64), torch.randn(40)
    panels = panel_gemm.pack(w)
    x = torch.randn(5, 64)
    assert panel_gemm.linear(x.bfloat16(), w.bfloat16()) is None
    assert panel_gemm.linear(torch.randn(5, 48), panels) is None
    assert panel_gemm.linear(x, panels, torch.randn(39)) is None
    assert panel_gemm.linear(x, panels, b.double()) is None
    strided = torch.randn(64, 5).T  # [5, 64], column stride 5
    assert panel_gemm.linear(strided, panels) is None
    assert torch.equal(kernels.panel_linear(strided, panels), panel_gemm.linear(strided.contiguous(), panels))
    x3 = torch.randn(2, 3, 64)
    flat = panel_gemm.linear(x3.reshape(6, 64), panels, b)
    assert torch.equal(kernels.panel_linear(x3, panels, b), flat.view(2, 3, 40))
    wb = w.bfloat16()
    torch.testing.assert_close(kernels.panel_linear(x.bfloat16(), wb), torch.nn.functional.linear(x.bfloat16(), wb),
                               atol=0.05, rtol=0.02)
    with pytest.raises(RuntimeError, match="panel GEMM"):
        kernels.panel_linear(x.bfloat16(), panels)
    assert kernels.prepare(kernels.panel_linear, wb) is wb  # bf16 weights stay as they are

