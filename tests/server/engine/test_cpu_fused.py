"""The C norm and RoPE kernels (server/engine/cpu_fused.c through cpu_fused.py): RoPE bitwise
HF's formula and the Gemma norm bitwise the model's module, in bf16 and fp32; attention's q/k
norms, RoPE and K/V writes in one call, and a residual add with its norms in one call, bitwise
the separate ops; refused (None) for what they do not take; and a runner's step is bit-identical
with and without them."""
from __future__ import annotations

import shutil

import pytest
import torch

from adapterctl.server.engine import cpu_build, cpu_fused
from adapterctl.server.engine.norms import FusedRMSNorm, fuse_norms

BUILDS_HERE = cpu_build.avx2_host() and shutil.which("cc") is not None
needs_kernel = pytest.mark.skipif(not BUILDS_HERE, reason="needs a C compiler and an AVX2 x86-64 CPU")


def test_kernels_load_where_they_can_be_built():
    assert (cpu_fused.library() is not None) == BUILDS_HERE


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_is_bitwise_hf_formula(dtype):
    g = torch.Generator().manual_seed(3)
    for n, heads, kv_heads, d in [(1, 4, 1, 256), (3, 8, 2, 64), (16, 4, 0, 128)]:
        qkv = (torch.randn(n, (heads + 2 * kv_heads) * d, generator=g) * 5).to(dtype)
        q = qkv[:, : heads * d].view(n, heads, d)  # strided, as the engine slices a packed q/k/v
        ang = torch.randn(n, 1, d, generator=g) * 100
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        got = cpu_fused.rope(q, cos, sin)
        assert got is not None and got.is_contiguous()
        want = q * cos + torch.cat((-q[..., d // 2:], q[..., : d // 2]), dim=-1) * sin  # HF's rotate_half
        assert got.dtype == want.dtype and torch.equal(got, want)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_first_max_is_argmax_on_strided_rows_and_refuses_the_rest(dtype):
    """Rows that are a column slice of a wider tensor (the row stride is not the width), widths with
    and without left-over scalars, ties, NaNs, signed zeros; a non-unit column stride is refused."""
    g = torch.Generator().manual_seed(5)
    wide = torch.randint(-20, 21, (7, 1000), generator=g).to(dtype)
    wide[1, 517], wide[1, 900] = float("nan"), float("nan")
    wide[2, :] = -0.0
    wide[2, 300] = 0.0
    wide[3, 960:] = 99.0  # the maximum first seen in the left-over scalars of width 967
    for lo, hi in ((0, 1000), (3, 967), (64, 96), (0, 5)):
        x = wide[:, lo:hi]
        assert torch.equal(cpu_fused.first_max(x), x.argmax(-1)), (lo, hi)
    assert cpu_fused.first_max(wide.t()) is None
    assert cpu_fused.first_max(wide[0]) is None


def _gemma_norm(dim: int, dtype: torch.dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(5)) * 0.5)
    return norm.to(dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_is_bitwise_the_gemma_module(dtype):
    """Widths with and without vectors and scalars left over by ATen's sum order (640 = 20 rows
    of four 8-lane vectors, 1152 = 36 with a cascade step, 100, 37), magnitudes 1e-2 to 40."""
    g = torch.Generator().manual_seed(9)
    for dim in (640, 256, 1152, 2048, 100, 37):
        norm = _gemma_norm(dim, dtype)
        scale = 1.0 + norm.weight.float()
        for shape, magnitude in [((1, dim), 1.0), ((7, dim), 40.0), ((2, 3, dim), 1e-2), ((64, dim), 3.0)]:
            x = (torch.randn(shape, generator=g) * magnitude).to(dtype)
            got, want = cpu_fused.rms_norm(x, scale, 1e-6), norm(x)
            assert got is not None and got.dtype == dtype and got.shape == x.shape
            assert torch.equal(got, want)


@needs_kernel
def test_what_the_kernels_do_not_take_is_refused():
    scale = torch.ones(64)
    assert cpu_fused.rms_norm(torch.randn(2, 64).double(), scale, 1e-6) is None  # fp64 rows
    assert cpu_fused.rms_norm(torch.randn(2, 64).bfloat16(), scale.bfloat16(), 1e-6) is None  # bf16 scale
    assert cpu_fused.rms_norm(torch.randn(cpu_fused.MAX_ROWS + 1, 64).bfloat16(), scale, 1e-6) is None
    assert cpu_fused.rms_norm(torch.randn(64, 2).bfloat16().T, scale, 1e-6) is None  # column-strided
    x = torch.randn(2, 4, 64)
    cos = torch.randn(2, 1, 64)
    assert cpu_fused.rope(x, cos.bfloat16(), cos.bfloat16()) is None  # dtypes differ
    assert cpu_fused.rope(x, cos[:1], cos[:1]) is None  # cos for another token count
    limit = cpu_fused.MAX_ROWS
    many, angles = torch.randn(limit + 1, 1, 64), torch.randn(limit + 1, 1, 64)
    assert cpu_fused.rope(many[:limit], angles[:limit], angles[:limit]) is not None  # the limit itself is taken
    assert cpu_fused.rope(many, angles, angles) is None
    assert cpu_fused.rope(x.double(), cos.double(), cos.double()) is None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_prep_is_the_separate_norms_rotations_and_cache_writes(dtype):
    g = torch.Generator().manual_seed(11)
    for n, heads, kvh, d, normed in [(1, 4, 1, 256, True), (3, 8, 2, 64, False), (5, 2, 2, 128, True)]:
        qkv = (torch.randn(n, (heads + 2 * kvh) * d, generator=g) * 4).to(dtype)
        q = qkv[:, : heads * d].view(n, heads, d)  # strided views of one packed projection
        k = qkv[:, heads * d: (heads + kvh) * d].view(n, kvh, d)
        v = qkv[:, (heads + kvh) * d:].view(n, kvh, d)
        ang = torch.randn(n, 1, d, generator=g) * 50
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        norms = ((1 + torch.randn(d, generator=g), 1e-6), (1 + torch.randn(d, generator=g), 1e-5)) if normed else None
        rows, pos = torch.randperm(6, generator=g)[:n], torch.randperm(40, generator=g)[:n]
        kc, vc = (torch.randn(6, kvh, 40, d, generator=g).to(dtype) for _ in range(2))
        want_k, want_v = kc.clone(), vc.clone()
        ref_norm = cpu_fused.reference_norm
        qn, kn = (q, k) if norms is None else (ref_norm(q, *norms[0]), ref_norm(k, *norms[1]))
        want_k[rows, :, pos] = cpu_fused.reference_rope(kn, cos, sin)
        want_v[rows, :, pos] = v
        got = cpu_fused.attention_prep(q, k, v, norms, cos, sin, kc, vc, rows, pos)
        assert got is not None and got.is_contiguous()
        assert torch.equal(got, cpu_fused.reference_rope(qn, cos, sin))
        assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # every other cache entry untouched
        before = kc.clone()
        assert cpu_fused.attention_prep(q, k, v, norms, cos, sin, kc, vc, rows, pos + 40) is None  # past the cache
        assert cpu_fused.attention_prep(q, k, v, norms, cos, sin, kc, vc, rows - 10, pos) is None
        assert torch.equal(kc, before)  # refused before anything was written
        assert cpu_fused.attention_prep(q, k, v, norms, cos, sin, kc, vc, rows.int(), pos) is None  # int32 index
        assert cpu_fused.attention_prep(q, k, v, norms, cos.float().double(), sin.double(), kc, vc, rows, pos) is None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_residual_norm_is_the_norm_the_add_and_the_next_norm(dtype):
    g = torch.Generator().manual_seed(12)
    for n, dim in [(1, 640), (5, 1152), (64, 100)]:
        a, h = (torch.randn(n, dim, generator=g) * 30).to(dtype), torch.randn(n, dim, generator=g).to(dtype)
        n1, n2 = (1 + torch.randn(dim, generator=g), 1e-6), (1 + torch.randn(dim, generator=g), 1e-5)
        got = cpu_fused.residual_norm(a, h, n1, n2)
        assert got is not None
        want_h = h + cpu_fused.reference_norm(a, *n1)
        assert torch.equal(got[0], want_h) and torch.equal(got[1], cpu_fused.reference_norm(want_h, *n2))
        only = cpu_fused.residual_norm(a, h, n1, None)
        assert only is not None and only[1] is None and torch.equal(only[0], want_h)
    a = torch.randn(4, 64).to(dtype)
    n1 = (torch.ones(64), 1e-6)
    assert cpu_fused.residual_norm(a.T.contiguous().T, a, n1, None) is None  # not contiguous
    assert cpu_fused.residual_norm(a, a[:2], n1, None) is None  # shapes differ
    assert cpu_fused.residual_norm(a, a, (torch.ones(64).bfloat16(), 1e-6), None) is None  # bf16 scale
    assert cpu_fused.residual_norm(torch.randn(cpu_fused.MAX_ROWS + 1, 64).to(dtype),
                                   torch.randn(cpu_fused.MAX_ROWS + 1, 64).to(dtype), n1, None) is None


@needs_kernel
def test_fuse_norms_routes_only_gemma_order_norms_to_the_kernel():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype, want in [(torch.bfloat16, True), (torch.float32, True), (torch.float16, False)]:
        llama = LlamaRMSNorm(64)
        with torch.no_grad():
            llama.weight.copy_(torch.randn(64) * 0.5)  # unit weights would make both orders one
        model = torch.nn.Sequential(_gemma_norm(64, dtype), llama.to(dtype))
        assert fuse_norms(model) == (2, 0)
        assert isinstance(model[0], FusedRMSNorm) and model[0].c_kernel is want
        # Llama casts before the scale: another order in bf16; in fp32 the cast is a no-op, so
        # its module is the Gemma-order computation and the kernel is exact for it too
        assert model[1].c_kernel is (dtype == torch.float32)
        model = torch.nn.Sequential(_gemma_norm(64, dtype))
        fuse_norms(model, c_kernel=False)
        assert model[0].c_kernel is False


@needs_kernel
def test_step_is_bit_identical_with_and_without_the_kernels(tiny_base):
    """A tiny Gemma 3's prefill and decode steps, in fp32 and bf16: the kernels change no bit. (The
    planned decode layers, which the kernels enable, are off: their attention and GELU are C's,
    not ATen's, and test_decode_layer holds them to that.)"""
    from adapterctl.basemodel import load_model
    from adapterctl.server.engine.runner import Chunk, ModelRunner

    def logits(dtype: str, fused_ops: bool) -> torch.Tensor:
        runner = ModelRunner(load_model(tiny_base, "cpu", dtype), max_rows=2, max_positions=64, num_slots=2, max_rank=4,
                             lora_modules=("q_proj", "v_proj"), fused_ops=fused_ops, planned_layers=False)
        assert all(isinstance(nq, tuple) for nq in runner.qk_norms) is fused_ops  # attention_prep's path, or not
        assert all(r is not None for r in runner.residual_norms) is fused_ops  # residual_norm's, or not
        out = []
        with torch.inference_mode():
            rows = [runner.kv.alloc_row(32) for _ in range(2)]
            chunks = [Chunk(rows[0], 0, [2, 5, 9, 11, 4], 0, True), Chunk(rows[1], 0, [2, 7], 0, True)]
            for step in range(3):
                fwd = runner.start(chunks)
                while fwd.step():
                    pass
                out.append(fwd.logits.float())
                chunks = [Chunk(c.row, c.start_pos + len(c.tokens), [int(fwd.logits[j].argmax())], 0, True)
                          for j, c in enumerate(chunks)]
        return torch.cat(out)

    assert torch.equal(logits("float32", True), logits("float32", False))
    assert torch.equal(logits("bfloat16", True), logits("bfloat16", False))
