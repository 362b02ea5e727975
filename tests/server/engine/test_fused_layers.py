"""The decode step's fusions are exact where they claim to be: fused RMSNorms are bitwise
the model's own modules (or are not used), and packed q/k/v and gate/up projections keep
each part's weights as views and its LoRA delta on its own columns."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adapterctl.server.engine.batch import LoraBatch, use_batch
from adapterctl.server.engine.kernels import torch_linear
from adapterctl.server.engine.lora import LoraLinear, LoraWeights, make_backend
from adapterctl.server.engine.norms import FusedRMSNorm, fuse_norms, fused_equivalent
from adapterctl.server.engine.packed import PackedLinear


def _norms():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return [Gemma3RMSNorm(48, eps=1e-6), LlamaRMSNorm(48, eps=1e-5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", [0, 1], ids=["gemma3", "llama"])
def test_fused_norm_is_bitwise_the_module(dtype, which):
    norm = _norms()[which]
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48) * 0.5)
    norm = norm.to(dtype)
    fused = fused_equivalent(norm)
    assert isinstance(fused, FusedRMSNorm)
    g = torch.Generator().manual_seed(7)
    for shape in [(1, 48), (33, 48), (2, 3, 48)]:  # other shapes and values than the probes
        x = (torch.randn(shape, generator=g) * 4).to(dtype)
        got, want = fused(x), norm(x)
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


class OddRMSNorm(nn.Module):
    """Named like an RMSNorm but computes something else: must be left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16))
        self.eps = 1e-6

    def forward(self, x):
        return x * self.weight + 1.0


def test_unknown_norm_semantics_are_kept():
    model = nn.Sequential(OddRMSNorm(), _norms()[0].__class__(16))
    fused, kept = fuse_norms(model)
    assert (fused, kept) == (1, 1)
    assert isinstance(model[0], OddRMSNorm) and isinstance(model[1], FusedRMSNorm)


def _lora_linear(inp: int, out: int, slots: int, rank: int, seed: int) -> LoraLinear:
    torch.manual_seed(seed)
    m = LoraLinear(nn.Linear(inp, out, bias=False).requires_grad_(False), f"p{seed}", make_backend("auto"),
                   torch_linear)
    a = torch.randn(slots + 1, rank, inp)
    bt = torch.randn(slots + 1, rank, out)
    a[0] = bt[0] = 0
    m.weights = LoraWeights(a, bt, torch.rand(slots + 1) + 0.5, [0] + [rank] * slots)
    return m


def test_packed_projection_equals_its_parts_with_lora():
    parts = [_lora_linear(32, n, 3, 4, seed) for seed, n in enumerate((64, 16, 16))]
    parts[1].weights = None  # k untargeted, as with q/v adapters
    x = torch.randn(6, 32)
    batch = LoraBatch.from_token_slots([0, 1, 1, 2, 3, 3])
    with use_batch(batch):
        want = [p(x) for p in parts]
    packed = PackedLinear(parts, torch_linear)
    storage = packed.weight.untyped_storage().data_ptr()
    assert all(p.base.weight.untyped_storage().data_ptr() == storage for p in parts)  # views, not copies
    with use_batch(batch):
        got = packed(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with use_batch(None):  # no batch: base only
        torch.testing.assert_close(packed(x)[0], x @ parts[0].base.weight.T)


def test_parts_of_different_widths_are_not_packed():
    parts = [_lora_linear(32, 8, 1, 2, 0), _lora_linear(16, 8, 1, 2, 1)]
    assert not PackedLinear.can_pack(parts)
    assert not PackedLinear.can_pack([nn.Linear(4, 4)])


def _file_weight(tiny_base):
    from adapterctl.basemodel import load_model

    model = load_model(tiny_base, "cpu", "float32")  # safetensors: weights are views of the file mapping
    return max((p for p in model.parameters() if p.dim() == 2), key=lambda p: p.numel()).detach()


def test_released_file_pages_read_back_the_same_bytes(tiny_base):
    from adapterctl.server.engine import pages

    w = _file_weight(tiny_base)
    before = w.clone()
    assert pages.release([w]) > 0
    assert torch.equal(w, before)  # faulted back in from the file
    assert pages.release([before]) == 0  # anonymous memory is never touched


def test_a_weight_written_in_place_is_not_released(tiny_base):
    from adapterctl.server.engine import pages

    w = _file_weight(tiny_base)
    w.mul_(2.0)
    doubled = w.clone()
    assert pages.release([w]) == 0
    assert torch.equal(w, doubled)


def _step_logits(tiny_base, rows: int, whole_head: bool, argmax_only: bool = False, dtype: str = "float32",
                 **runner_args):
    """(runner, logits of a 4-token prefill and three decode steps of ``rows`` base rows; with
    ``argmax_only`` the forwards' tokens instead)."""
    from adapterctl.basemodel import load_model
    from adapterctl.server.engine.runner import Chunk, ModelRunner

    r = ModelRunner(load_model(tiny_base, "cpu", dtype), max_rows=rows, max_positions=64, num_slots=2,
                    max_rank=8, lora_modules=("q_proj", "v_proj"), **runner_args)
    out = []
    with torch.inference_mode():
        for i in range(rows):
            r.kv.alloc_row(32)
        plans = [[Chunk(i, 0, [2, 40 + i, 7, 300 + i], 0, True, argmax_only) for i in range(rows)]]
        plans += [[Chunk(i, 4 + k, [50 + k + i], 0, True, argmax_only) for i in range(rows)] for k in range(3)]
        for chunks in plans:
            fwd = r.start(chunks)
            while fwd.step(whole_head=whole_head):
                pass
            assert (fwd.logits is None) == argmax_only and (fwd.tokens is None) != argmax_only
            out.append(fwd.tokens if argmax_only else fwd.logits.clone())
    return r, out


@pytest.mark.parametrize("prepack", [True, False])
def test_argmax_only_rows_get_the_argmax_of_the_full_logits(tiny_base, prepack, monkeypatch):
    """Without the greedy head, argmax-only rows reduce each LM-head slice as it is computed: the
    tokens are the argmax of the logits the same forward stores for other rows, whole or sliced."""
    from adapterctl.server.engine.runner import Forward

    monkeypatch.setattr(Forward, "head_chunk", 1000)  # several head slices on the tiny vocab
    for rows in (1, 9):
        _, full = _step_logits(tiny_base, rows, True, prepack=prepack, greedy_head=False)
        for whole_head in (True, False):
            _, tokens = _step_logits(tiny_base, rows, whole_head, argmax_only=True, prepack=prepack,
                                     greedy_head=False)
            assert tokens == [logits.argmax(-1).tolist() for logits in full]


def test_greedy_head_in_slices_gives_the_full_heads_tokens_with_another_forward_between(tiny_base):
    """With newcomers waiting, the greedy head's estimate runs one vocabulary slice per piece; the
    tokens are those of the whole head, also when another forward's greedy head runs between two
    slices (as an interleaved prefill's does). This tiny model's logits would not expose two runs
    sharing one estimate buffer; test_greedy_head's pieces test does."""
    from adapterctl.server.engine.runner import Chunk, Forward

    _, full = _step_logits(tiny_base, 3, True, greedy_head=False)
    r, whole = _step_logits(tiny_base, 3, True, argmax_only=True)
    _, sliced = _step_logits(tiny_base, 3, False, argmax_only=True)
    assert r.greedy_head is not None
    assert whole == sliced == [logits.argmax(-1).tolist() for logits in full]

    def run(rows: list[int], whole_head: bool) -> Forward:
        fwd = r.start([Chunk(i, 7, [60 + i], 0, True, True) for i in rows])
        while fwd.step(whole_head=whole_head):
            pass
        return fwd

    with torch.inference_mode():
        alone, other = run([0, 1], True).tokens, run([2], True).tokens
        paused = r.start([Chunk(i, 7, [60 + i], 0, True, True) for i in (0, 1)])
        pieces = 0
        while paused.step():
            pieces += 1
            if pieces == len(r.layers) + 2:  # the layers, the final norm, one slice of the estimate
                assert paused.tokens is None and run([2], False).tokens == other
        assert pieces > len(r.layers) + 2  # the estimate did run in slices
        assert paused.tokens == alone


@pytest.mark.parametrize("rows", [1, 5])
def test_fused_step_logits_are_bit_identical_to_the_unfused_step(tiny_base, rows):
    """What README and BENCHMARKS claim for the fused decode step (bench/step_bench.py measures its speed).
    Without the planned decode layers, whose attention and GELU are C's (test_decode_layer)."""

    _, unfused = _step_logits(tiny_base, rows, False, fuse=False, planned_layers=False)
    _, fused = _step_logits(tiny_base, rows, True, fuse=True, planned_layers=False)
    assert all(torch.equal(a, b) for a, b in zip(unfused, fused))


def test_prepared_weights_are_exact_from_8_rows_and_keep_the_plain_fallback():
    """``kernels.prepare``: oneDNN's blocked fp32 layout gives bitwise the plain oneDNN
    result for 8+ rows (and fp32-close at one row); any other kernel or dtype gets the weight
    itself, unchanged."""
    from adapterctl.server.engine import kernels

    w, b = torch.randn(96, 48), torch.randn(96)
    assert kernels.prepare(torch_linear, w) is w
    wb = w.bfloat16()
    if kernels._reorder_runs(torch.bfloat16):  # oneDNN runs bf16 (natively, or emulated on AVX-512)
        xb = torch.randn(5, 48).bfloat16()
        packed = kernels.prepare(kernels.onednn_linear, wb)
        assert packed is not wb and packed.is_mkldnn
        torch.testing.assert_close(kernels.onednn_linear(xb, packed), kernels.onednn_linear(xb, wb))
    else:
        assert kernels.prepare(kernels.onednn_linear, wb) is wb  # bf16 emulated: the weight itself
    assert kernels.prepare(kernels.upcast_linear, wb) is wb
    if not kernels._reorder_runs(torch.float32):
        pytest.skip("this torch build cannot reorder oneDNN weights")
    packed = kernels.prepare(kernels.onednn_linear, w)
    assert packed is not w and packed.is_mkldnn
    for rows in (8, 33):
        x = torch.randn(rows, 48)
        assert torch.equal(kernels.onednn_linear(x, packed, b), kernels.onednn_linear(x, w, b))
    x = torch.randn(1, 48)
    torch.testing.assert_close(kernels.onednn_linear(x, packed, b), x @ w.T + b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 8])
def test_prepacked_step_matches_the_plain_layout(tiny_base, rows, monkeypatch):
    """The engine's step with weights in oneDNN's layout (``prepack``, LM head in prepared
    vocab slices, whole or piece by piece) against the plain-layout step: bit-identical
    logits from 8 rows on, fp32-close at one row; the prepared head slices cover the vocab."""
    from adapterctl.server.engine import kernels
    from adapterctl.server.engine.runner import Forward

    if not kernels._reorder_runs(torch.float32):
        pytest.skip("this torch build cannot reorder oneDNN weights")
    monkeypatch.setattr(Forward, "head_chunk", 1000)  # several head slices on the tiny vocab

    plain_runner, plain = _step_logits(tiny_base, rows, True, gemm="onednn", prepack=False)
    assert plain_runner.head_parts is None
    for whole_head in (True, False):
        runner, prepared = _step_logits(tiny_base, rows, whole_head, gemm="onednn", prepack=True)
        vocab = runner.config.vocab_size
        bounds = [(lo, hi) for lo, hi, _ in runner.head_parts]
        assert bounds[0][0] == 0 and bounds[-1][1] == vocab and all(hi - lo <= Forward.head_chunk for lo, hi in bounds)
        assert len(bounds) > 2 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        for a, b in zip(plain, prepared):
            if rows >= 8:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_fp32_runners_get_panels_and_step_as_onednn_does(tiny_base):
    """``auto`` on an AVX-512F or AVX2 CPU: fp32 runners use :func:`kernels.panel_linear`; the packs, the
    other projections and the LM head slices hold panels, and the steps' logits (a 4-token prefill,
    then decode) are fp32-close to the oneDNN runner's."""
    from adapterctl.server.engine import kernels, panel_gemm

    if panel_gemm.library() is None:
        pytest.skip("the fp32 panel GEMM does not load here (it needs AVX2 + FMA and a C compiler)")
    assert kernels.pick_gemm("auto", torch.device("cpu"), torch.float32) is kernels.panel_linear
    assert kernels.pick_gemm("onednn", torch.device("cpu"), torch.float32) is kernels.onednn_linear
    runner, got = _step_logits(tiny_base, 3, True)
    assert runner.gemm is kernels.panel_linear
    packs = [p for p in (*runner.qkv, *runner.gate_up) if p is not None]
    assert packs and all(isinstance(p.weight, panel_gemm.Panels) for p in packs)
    others = [m for layer in runner.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    assert all(isinstance(m.operand, panel_gemm.Panels) for m in others)
    assert runner.head_parts and all(isinstance(op, panel_gemm.Panels) for _, _, op in runner.head_parts)
    _, ref = _step_logits(tiny_base, 3, True, gemm="onednn")
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_small_rows_gemv_step_keeps_the_packs_plain_and_matches_onednn(tiny_base):
    """bf16 where ``auto`` is ``kernels.small_rows_linear`` (AVX512-BF16, no AMX): each pack keeps
    its plain weight beside oneDNN's blocked copy, with the projections' weights views of it (not a
    third copy), and the steps' logits (1-2 rows: the C GEMV; the 4-token prefill: oneDNN) are
    bf16-close to oneDNN's everywhere."""
    from adapterctl.server.engine import kernels

    if not (kernels.native_bf16() and kernels._small_rows_pay()):
        pytest.skip("needs native bf16 oneDNN with AVX512-BF16 and no AMX")
    runner, got = _step_logits(tiny_base, 2, True, dtype="bfloat16")
    assert runner.gemm is kernels.small_rows_linear
    packs = [p for p in (*runner.qkv, *runner.gate_up) if p is not None]
    assert packs and all(isinstance(p.weight, kernels.Dual) for p in packs)
    for pack in packs:
        storage = pack.weight.plain.untyped_storage().data_ptr()
        assert all(part.base.weight.untyped_storage().data_ptr() == storage for part in pack.parts)
    _, ref = _step_logits(tiny_base, 2, True, dtype="bfloat16", gemm="onednn")
    for a, b in zip(ref, got):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.float(), atol=0.05, rtol=0.02)
