"""The bf16 GEMVs (server/engine/gemv_bf16.c, AVX2, gemv_bf16_avx512f.c, AVX-512F, and
gemv_bf16_avx512.c, AVX512-BF16, through cpu_gemv.py): built once per machine, correct to one
bf16 ulp against exact arithmetic for every row count, and refused (None) for what they do not
handle so callers fall back to ATen/oneDNN."""
from __future__ import annotations

import shutil

import pytest
import torch

from adapterctl.server.engine import cpu_build, cpu_gemv

BUILDS_HERE = cpu_build.avx2_host() and shutil.which("cc") is not None


KERNELS = [pytest.param(cpu_gemv.AVX2, id="avx2"), pytest.param(cpu_gemv.AVX512, id="avx512"),
           pytest.param(cpu_gemv.AVX512_BF16, id="avx512_bf16")]


def _lib(kernel=cpu_gemv.AVX2):
    if not BUILDS_HERE:
        pytest.skip("the kernel needs Linux x86-64 with AVX2/FMA and a C compiler")
    if kernel.cpu_flag is not None and not cpu_build.has_cpu_flag(kernel.cpu_flag):
        assert cpu_gemv.library(kernel) is None
        pytest.skip(f"this CPU has no {kernel.cpu_flag}")
    lib = cpu_gemv.library(kernel)
    assert lib is not None, "the kernel should build and pass its probe on this machine"
    return lib


def _exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return (y if b is None else y + b.double()).bfloat16()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", [0, 640, 2048])
def test_every_row_count_is_within_one_bf16_ulp_of_exact(kernel, k):
    _lib(kernel)
    k = k or kernel.k_multiple
    gen = torch.Generator().manual_seed(k)
    big = torch.randn(1100, k + 32, generator=gen).bfloat16()
    for w in (big[3:1032, :k], big[:37, :k].contiguous()):  # strided rows and a ragged width
        for rows in range(1, kernel.max_rows + 1):
            x = torch.randn(rows, k + 16, generator=gen).bfloat16()[:, :k]  # strided rows of x too
            y = cpu_gemv.linear(x, w, None, kernel)
            want = _exact(x, w, None)
            assert y is not None and y.dtype == torch.bfloat16 and y.shape == (rows, w.shape[0])
            torch.testing.assert_close(y.float(), want.float(), atol=1e-5, rtol=2 ** -7)
            assert (y == want).float().mean() > 0.9  # mostly the correctly rounded value


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_prefetch_pattern_does_not_change_a_bit(kernel):
    """Contiguous short rows take the in-order prefetch, strided ones one stream per row; the
    arithmetic is the same, so each output row is bitwise the same, whatever rows come with it
    (the greedy head's rescoring of a few vocabulary rows relies on that)."""
    _lib(kernel)
    gen = torch.Generator().manual_seed(7)
    big = torch.randn(517, 640 + 32, generator=gen).bfloat16()
    strided, packed = big[:, :640], big[:, :640].contiguous()
    for rows in (1, 2, 3, 4, 7):
        if rows > kernel.max_rows:
            continue
        x = torch.randn(rows, 640, generator=gen).bfloat16()
        y = cpu_gemv.linear(x, packed, None, kernel)
        assert torch.equal(y, cpu_gemv.linear(x, strided, None, kernel))
        some = torch.tensor([5, 6, 300, 516])
        assert torch.equal(y[:, some], cpu_gemv.linear(x, packed.index_select(0, some), None, kernel))


@pytest.mark.parametrize("kernel", KERNELS)
def test_bias_is_added_before_the_rounding(kernel):
    _lib(kernel)
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(300, 64, generator=gen).bfloat16(), (100 * torch.randn(300, generator=gen)).bfloat16()
    x = torch.randn(2, 64, generator=gen).bfloat16()
    y, want = cpu_gemv.linear(x, w, b, kernel), _exact(x, w, b)
    torch.testing.assert_close(y.float(), want.float(), atol=1e-5, rtol=2 ** -7)
    assert (y == want).float().mean() > 0.9
    assert (y != (x.float() @ w.float().T).bfloat16() + b).any()  # one rounding, not two


@pytest.mark.parametrize("kernel", KERNELS)
def test_inf_and_nan_propagate(kernel):
    _lib(kernel)
    k = kernel.k_multiple
    w = torch.ones(4, k, dtype=torch.bfloat16)
    w[1, 3], w[2, 5] = float("inf"), float("nan")
    y = cpu_gemv.linear(torch.ones(1, k, dtype=torch.bfloat16), w, None, kernel)
    assert y[0, 0].item() == k and y[0, 1].item() == float("inf") and y[0, 2].isnan() and y[0, 3].item() == k


def test_upcast_takes_the_avx512_gemv_where_it_loads_else_the_avx2_one(monkeypatch):
    """``kernels.upcast_linear`` and its planned layers use :func:`cpu_gemv.upcast_kernel`: the
    AVX-512F GEMV on CPUs with avx512f (twice the FMA width), the AVX2 one where it does not load
    or for input widths that are not a multiple of 32."""
    _lib()
    want = cpu_gemv.AVX512 if cpu_build.has_cpu_flag("avx512f") else cpu_gemv.AVX2
    assert cpu_gemv.upcast_kernel() is cpu_gemv.upcast_kernel(640, 2048) is want
    assert cpu_gemv.upcast_kernel(640, 48) is cpu_gemv.AVX2  # a width the AVX-512 kernel does not take
    assert (cpu_gemv.library(cpu_gemv.AVX512) is not None) == (want is cpu_gemv.AVX512)
    real = cpu_gemv.library
    monkeypatch.setattr(cpu_gemv, "library", lambda kernel=None: None if kernel == cpu_gemv.AVX512 else real(kernel))
    assert cpu_gemv.upcast_kernel() is cpu_gemv.AVX2


def test_it_runs_on_torchs_openmp_runtime():
    """Loading the kernel adds no OpenMP runtime of its own (two pools would fight for the
    cores): its ``libgomp.so.1`` resolves to the one torch loaded. In a fresh interpreter, since
    other wheels (sentencepiece) vendor their own libgomp under another name."""
    import subprocess
    import sys

    _lib()
    code = ("import torch\n"
            "from adapterctl.server.engine import cpu_gemv\n"
            "maps = lambda: {l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}\n"
            "before = maps(); assert cpu_gemv.library() is not None; print(sorted(before), sorted(maps()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = done.stdout.strip().split("] [")
    assert before + "]" == "[" + after and "torch" in after, done.stdout


@pytest.mark.parametrize("kernel", KERNELS)
def test_what_it_does_not_handle_is_refused(kernel):
    _lib(kernel)
    k = 3 * kernel.k_multiple
    w = torch.randn(8, k).bfloat16()
    assert cpu_gemv.linear(torch.randn(kernel.max_rows + 1, k).bfloat16(), w, None, kernel) is None  # too many rows
    odd = torch.randn(8, k - 8).bfloat16()
    assert cpu_gemv.linear(torch.randn(2, k - 8).bfloat16(), odd, None, kernel) is None  # k % k_multiple
    assert cpu_gemv.linear(torch.randn(2, k), w.float(), None, kernel) is None  # fp32
    assert cpu_gemv.linear(torch.randn(2, k).bfloat16(), w.T.contiguous().T, None, kernel) is None  # column-strided
    assert cpu_gemv.linear(torch.randn(2, k).bfloat16(), w, torch.randn(8), kernel) is None  # fp32 bias


def test_build_is_cached_atomic_and_a_failing_compiler_leaves_nothing(tmp_path, monkeypatch):
    if not BUILDS_HERE:
        pytest.skip("needs a C compiler and an AVX2 x86-64 CPU")
    monkeypatch.setenv("ADAPTERCTL_KERNEL_CACHE", str(tmp_path / "k"))
    built = cpu_build.build(cpu_gemv.AVX2.source, cpu_gemv.AVX2.flags)
    assert built.parent == tmp_path / "k" and built.name.startswith("gemv_bf16-") and built.stat().st_size > 0
    mtime = built.stat().st_mtime_ns
    assert cpu_build.build(cpu_gemv.AVX2.source, cpu_gemv.AVX2.flags) == built and built.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "k").iterdir()] == [built.name]  # no temporary left
    monkeypatch.setenv("CC", "false")  # a compiler that fails: a different digest, so a fresh build
    with pytest.raises(RuntimeError, match="false failed"):
        cpu_build.build(cpu_gemv.AVX2.source, cpu_gemv.AVX2.flags)
    assert [p.name for p in (tmp_path / "k").iterdir()] == [built.name]


def test_every_kernel_builds_for_the_image(tmp_path, monkeypatch, capsys):
    """``python -m adapterctl.server.engine.cpu_build`` (the images' build step) compiles each C
    source of the package, the AMX and VNNI ones too (compiling needs neither in the CPU)."""
    if not BUILDS_HERE:
        pytest.skip("needs a C compiler and an AVX2 x86-64 CPU")
    monkeypatch.setenv("ADAPTERCTL_KERNEL_CACHE", str(tmp_path / "k"))
    cpu_build.main()
    built = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "k").iterdir()}
    assert built == {"gemv_bf16", "gemv_bf16_avx512f", "gemv_bf16_avx512", "cpu_fused", "gemv_i8", "gemv_i8_amx",
                     "gemv_i8_vnni", "decode_layer", "lora_cpu", "amx_head", "gemm_f32_avx512", "gemm_f32_avx2",
                     "gemm_bf16_amx"}
    assert len(capsys.readouterr().out.split()) == 13


def test_a_changed_header_rebuilds(tmp_path, monkeypatch):
    """A kernel's digest covers the headers beside it (bf16.h), so editing one cannot leave a
    stale library in the cache."""
    if not BUILDS_HERE:
        pytest.skip("needs a C compiler and an AVX2 x86-64 CPU")
    monkeypatch.setenv("ADAPTERCTL_KERNEL_CACHE", str(tmp_path / "k"))
    src = tmp_path / "src"
    src.mkdir()
    for name in ("gemv_bf16.c", "bf16.h"):
        (src / name).write_text((cpu_gemv.AVX2.source.parent / name).read_text())
    first = cpu_build.build(src / "gemv_bf16.c", cpu_gemv.AVX2.flags)
    (src / "bf16.h").write_text((src / "bf16.h").read_text() + "\n/* edited */\n")
    second = cpu_build.build(src / "gemv_bf16.c", cpu_gemv.AVX2.flags)
    assert first != second and first.exists() and second.exists()
