"""The int8 greedy LM head (server/engine/greedy_head.py, int8_gemv.py, gemv_i8.c, gemv_i8_vnni.c,
gemv_i8_amx.c):
the token it gives is the full head's on every row, ties and near-ties included; where the head's
GEMM is the C bf16 GEMV or the fp32 panel GEMM its logits are bitwise the full head's; the bound holds on every logit
with every estimator, in bf16 and fp32; it declines what it cannot bound; and the engine uses it
only for argmax-only rows, with the same greedy tokens as without it."""
from __future__ import annotations

import pytest
import torch

from adapterctl.server.engine import cpu_gemv, greedy_head, int8_gemv, kernels
from adapterctl.server.engine.greedy_head import GreedyHead
from adapterctl.server.engine.kernels import torch_linear, upcast_linear

KERNELS = cpu_gemv.library() is not None and int8_gemv.library() is not None
pytestmark = pytest.mark.skipif(not KERNELS, reason="needs the C kernels (a C compiler, an AVX2 x86-64 CPU)")


def _estimators() -> list:
    """Every estimator that runs here: AVX2 always (with the kernels), AVX512-VNNI and AMX on CPUs
    that have them."""
    if not KERNELS:
        return []
    out = [pytest.param(int8_gemv.Avx2Estimator(int8_gemv.library()), id="avx2")]
    if int8_gemv.vnni_library() is not None:
        out.append(pytest.param(int8_gemv.VnniEstimator(int8_gemv.library(), int8_gemv.vnni_library()), id="vnni"))
    if int8_gemv.amx_library() is not None:
        out.append(pytest.param(int8_gemv.AmxEstimator(int8_gemv.library(), int8_gemv.amx_library()), id="amx"))
    return out


ESTIMATORS = _estimators()
FP32_GEMM = kernels.onednn_linear if kernels._onednn_runs(torch.float32) else torch_linear


def _head(vocab: int, k: int, seed: int, near: float = 2 ** -7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, k, generator=g) * 0.05
    w[:, 0] *= 20  # a large column: an int8 row scale coarser than most of the row needs
    w[3] = torch.randn(k, generator=g) * 0.4  # the row hs[0] aims at below
    w[7] = w[3]  # exact duplicates: tied logits, the first must win
    w[vocab - 1] = w[3]
    w[11] = w[3] * (1 - near)  # a near-tie: about one ulp of the dtype below row 3
    return w


@pytest.mark.parametrize("est", ESTIMATORS)
def test_bf16_tokens_and_logits_are_the_full_heads(est):
    w = _head(8192 + 5, 64, 0).bfloat16()
    head = GreedyHead(w, upcast_linear, est)
    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        rows = 1 + trial % 5
        hs = (torch.randn(rows, 64, generator=g) * (0.3 + trial)).bfloat16()
        hs[0] = w[3] * (1 + trial)  # aims at the tied rows 3, 7, vocab - 1 and the near-tie 11
        full = cpu_gemv.linear(hs, w)
        idx, count = head.candidates(hs)
        assert bool((count >= 1).all()) and int(count.sum()) < full.numel() // 20  # the bound is selective
        assert 3 in idx[0, : count[0]].tolist()  # the tie's first row is kept
        tokens, logits = head.tokens(hs)
        assert torch.equal(tokens, full.argmax(-1))
        assert int(tokens[0]) == 3  # the first of the tied rows, as on the full row
        assert logits.dtype == torch.bfloat16
        assert torch.equal(logits, full.gather(1, tokens[:, None])[:, 0])  # bitwise, not just the same argmax


@pytest.mark.parametrize("est", ESTIMATORS)
def test_fp32_tokens_are_the_full_heads(est):
    """fp32 (the head's GEMM is oneDNN's): the same first maximum, ties and a near-tie two
    thousand times the fp32 rounding included; the candidates' logits are the GEMM's."""
    w = _head(8192 + 5, 64, 6, near=2 ** -12)
    head = GreedyHead(w, FP32_GEMM, est)
    g = torch.Generator().manual_seed(7)
    for trial in range(30):
        rows = 1 + trial % 7
        hs = torch.randn(rows, 64, generator=g) * (0.3 + trial)
        hs[0] = w[3] * (1 + trial)
        full = FP32_GEMM(hs, w, None)
        tokens, logits = head.tokens(hs)
        assert torch.equal(tokens, full.argmax(-1)) and int(tokens[0]) == 3
        torch.testing.assert_close(logits, full.gather(1, tokens[:, None])[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("est", ESTIMATORS)
def test_fp32_logits_through_the_panel_gemm_are_the_full_heads_bitwise(est):
    """fp32 where the head's GEMM is the panel GEMM: the candidates' logits (plain rows
    gathered from the head) are bitwise the full head's through its panels, as the engine's
    prepared head slices compute them, since each output is the same sum whichever rows and
    outputs share the call."""
    from adapterctl.server.engine import panel_gemm

    if panel_gemm.library() is None:
        pytest.skip("the fp32 panel GEMM does not load here (it needs AVX2 + FMA and a C compiler)")
    w = _head(8192 + 5, 640, 8, near=2 ** -12)  # Gemma 3 270M's width: a blocked GEMM sums it in another order
    head, panels = GreedyHead(w, kernels.panel_linear, est), panel_gemm.pack(w)
    g = torch.Generator().manual_seed(9)
    for trial in range(20):
        hs = torch.randn(1 + trial % 7, 640, generator=g) * (0.3 + trial)
        hs[0] = w[3] * (1 + trial)
        full = kernels.panel_linear(hs, panels)
        tokens, logits = head.tokens(hs)
        assert torch.equal(tokens, full.argmax(-1)) and int(tokens[0]) == 3
        assert torch.equal(logits, full.gather(1, tokens[:, None])[:, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("est", ESTIMATORS)
def test_bound_holds_on_every_logit(est, dtype):
    """The bound itself, not only its argmax: |estimate - logit| <= d for every vocabulary row,
    with d as the module docstring states it (weights' and x's rounding, the dtype's rounding),
    for the GEMM's logits and for the exact ones."""
    w = _head(4096 + 3, 128, 2).to(dtype)
    gemm = upcast_linear if dtype == torch.bfloat16 else FP32_GEMM
    head = GreedyHead(w, gemm, est)
    g = torch.Generator().manual_seed(3)
    hs = (torch.randn(7, 128, generator=g) * 5).to(dtype)
    hs[2, 9] = 300  # one large activation: x's int16 step is coarse for the rest of its row
    est_, ex = head.estimate(hs)
    x1 = hs.float().abs().sum(-1, keepdim=True)
    bound = head.coef[None, :] * x1 + head.qa[None, :] * ex[:, None] + est_.abs() * greedy_head.REL[dtype]
    for exact in (gemm(hs, w, None).float(), (hs.double() @ w.double().T).float()):
        assert bool(((est_ - exact).abs() <= bound).all())
    assert float((est_ - exact).abs().max()) > 0  # an estimate, so the test is not vacuous
    assert float(ex[2]) > 10 * float(ex[0]) > 0  # x's rounding is measured per row


@pytest.mark.parametrize("est", ESTIMATORS)
def test_a_batch_estimates_each_row_as_it_would_alone(est):
    """However the kernel blocks rows (the AVX2 one serves blocks of three from one widened
    group; AMX passes of 24), each row's estimate is bitwise its estimate alone: partial blocks,
    a vocabulary that is not a multiple of any group, and more rows than one AMX pass."""
    w = _head(4096 + 3, 128, 9)
    head = GreedyHead(w, FP32_GEMM, est)
    hs = torch.randn(26, 128, generator=torch.Generator().manual_seed(10)) * 3
    batch, ex = head.estimate(hs)
    batch, ex = batch.clone(), ex.clone()
    for r in (0, 4, 9, 24, 25):
        alone, ex_alone = head.estimate(hs[r: r + 1])
        assert torch.equal(batch[r], alone[0]) and torch.equal(ex[r], ex_alone[0])


@pytest.mark.parametrize("est", ESTIMATORS)
def test_pieces_give_a_whole_pass_tokens_with_other_rows_estimated_between(est):
    """``pieces`` (the estimate a vocabulary slice at a time, as a forward runs it when newcomers
    wait) gives the tokens of a whole pass, also when other rows' estimates run between its
    slices: rows with large logits early in the vocabulary would raise this run's floor above
    its true maximum if they shared its estimate buffer."""
    w = _head(8192 + 5, 64, 11)
    head = GreedyHead(w, FP32_GEMM, est)
    g = torch.Generator().manual_seed(12)
    a = torch.randn(3, 64, generator=g) * 2
    b = (w[3] * 40).repeat(2, 1)  # logits of ~400 at vocabulary row 3, in the first slice
    want = head.tokens(a)
    assert int(want[0].min()) >= 1024  # every true maximum lies beyond the first slice
    run, slices = head.pieces(a, 1024), 0
    for got in run:
        if got is not False:
            break
        slices += 1
        assert head.tokens(b)[0].tolist() == [3, 3]
        assert list(head.pieces(b, 4096))[-1][0].tolist() == [3, 3]
    assert slices == 8
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _exact_int8_head(vocab: int, k: int, seed: int) -> torch.Tensor:
    """Weights q / 64 with integer q, |q| <= 127 and 127 in column 0 of every row: the int8 copy
    is exact (scale 1/64), so only x's rounding, the sums and bf16's rounding remain."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (vocab, k), generator=g).float()
    q[:, 0], q[:, 1] = 127, 0
    return (q / 64).bfloat16()


@pytest.mark.parametrize("est", ESTIMATORS)
def test_each_term_of_the_bound_is_needed(est):
    """Two heads on which one term of d is most of the error: without it the bound fails on some
    logit, with it the bound holds on all (so a term made too small fails this test)."""
    w = _exact_int8_head(64, 64, 5)
    head = GreedyHead(w, upcast_linear, est)
    rel_of = greedy_head.REL[torch.bfloat16]
    x1_term = lambda hs: head.coef[None, :] * hs.float().abs().sum(-1, keepdim=True)  # noqa: E731
    # x's int16 rounding: an outlier where w is 0 makes the int16 step ~2^-4, and every other
    # element is 2^-5 with w's sign, so each rounds to 0 with the error aligned to w
    hs = (torch.sign(w[:8].float()) * 2.0 ** -5).bfloat16()
    hs[:, 1] = 2048
    est_, ex = head.estimate(hs)
    err = (est_ - cpu_gemv.linear(hs, w).float()).abs()
    rel = est_.abs() * rel_of
    assert bool((err <= x1_term(hs) + head.qa[None, :] * ex[:, None] + rel).all())
    assert bool((err > x1_term(hs) + rel).any())
    # bf16's rounding of large logits: x = w's signs, exact in int16, so only the sums and the
    # final bf16 rounding are left
    hs = torch.sign(w[8:16].float()).bfloat16()
    est_, ex = head.estimate(hs)
    err = (est_ - cpu_gemv.linear(hs, w).float()).abs()
    rest = x1_term(hs) + head.qa[None, :] * ex[:, None]
    assert bool((err <= rest + est_.abs() * rel_of).all())
    assert bool((err > rest).any())


def test_declines_what_it_cannot_bound():
    w = _head(256, 64, 4).bfloat16()
    assert GreedyHead.build(w.half(), None, None, upcast_linear) is None  # fp16: no rounding term for it
    assert GreedyHead.build(w, torch.zeros(256).bfloat16(), None, upcast_linear) is None  # bias
    assert GreedyHead.build(w, None, 30.0, upcast_linear) is None  # softcapped logits
    assert GreedyHead.build(_head(256, 40, 4).bfloat16(), None, None, upcast_linear) is None  # k % 16
    assert GreedyHead.build(_head(16, int8_gemv.MAX_K + 16, 4).bfloat16(), None, None, upcast_linear) is None
    assert GreedyHead.build(w.float(), None, None, FP32_GEMM) is not None  # fp32 heads are taken
    head = GreedyHead.build(w, None, None, upcast_linear)
    bad = torch.ones(2, 64).bfloat16()
    bad[1, 5] = float("inf")
    assert head.tokens(bad) is None  # the caller runs the full head
    assert head.takes(head.max_rows) and not head.takes(head.max_rows + 1) and not head.takes(0)


def test_a_head_that_requires_grad_leaves_no_graph_behind():
    """A model's LM head is a Parameter that requires grad; the int8 copy and its bounds must not
    hold an autograd graph (it kept every quantisation block's intermediates: ~6 GB on Gemma)."""
    w = torch.nn.Parameter(_head(4096, 64, 8))
    head = GreedyHead.build(w, None, None, FP32_GEMM)
    assert all(not t.requires_grad and t.grad_fn is None for t in (head.scale, head.coef, head.qa, head.weight))
    tokens, logits = head.tokens(torch.randn(2, 64))
    assert not logits.requires_grad


def test_a_native_bf16_head_keeps_the_estimate_to_few_rows():
    """Where oneDNN runs the bf16 head in hardware (AVX512-BF16) it beats the AVX2 estimate from
    ~8 rows, so the estimate stops at NATIVE_BF16_ROWS there; an upcast bf16 head and any fp32 head
    keep it to 64 rows. AMX's estimate keeps its own limits."""
    w = _head(256, 64, 4).bfloat16()
    avx2 = int8_gemv.Avx2Estimator(int8_gemv.library())
    native = GreedyHead(w, kernels.onednn_linear, avx2)
    assert native.max_rows == int8_gemv.Avx2Estimator.NATIVE_BF16_ROWS <= 8
    assert native.takes(native.max_rows) and not native.takes(native.max_rows + 1)
    assert GreedyHead(w, kernels.small_rows_linear, avx2).max_rows == native.max_rows  # oneDNN beyond 4 rows
    assert GreedyHead(w, upcast_linear, avx2).max_rows == 64
    assert GreedyHead(w.float(), kernels.onednn_linear, avx2).max_rows == 64
    if int8_gemv.amx_library() is not None:
        amx = int8_gemv.AmxEstimator(int8_gemv.library(), int8_gemv.amx_library())
        assert GreedyHead(w, kernels.onednn_linear, amx).max_rows == int8_gemv.AmxEstimator.ROWS_PER_PASS
    if int8_gemv.vnni_library() is not None:  # the VNNI estimate beats oneDNN's bf16 head up to 32 rows
        vnni = int8_gemv.VnniEstimator(int8_gemv.library(), int8_gemv.vnni_library())
        assert GreedyHead(w, kernels.small_rows_linear, vnni).max_rows == int8_gemv.VnniEstimator.NATIVE_BF16_ROWS == 32
        assert GreedyHead(w.float(), kernels.onednn_linear, vnni).max_rows == 64


def test_the_estimator_fits_the_input_width():
    """AMX tiles take 64 inputs at a time, the VNNI kernel 32: other widths (multiples of 16) get
    the AVX2 estimate."""
    assert int8_gemv.estimator(40) is None and int8_gemv.estimator(int8_gemv.MAX_K + 64) is None
    assert int8_gemv.estimator(80).name == "avx2"
    vnni = "vnni" if int8_gemv.vnni_library() is not None else "avx2"
    assert int8_gemv.estimator(96).name == vnni  # not a multiple of 64: no AMX
    want = "amx" if int8_gemv.amx_library() is not None else vnni
    assert int8_gemv.estimator(128).name == want


def test_the_vnni_estimate_is_the_avx2_ones_bitwise():
    """The AVX512-VNNI kernel computes the same exact integer sums as the AVX2 one and rounds them
    once the same way: every row count across its blocks of 16, 8, 4, 2 and 1 rows, a vocabulary
    that is not a multiple of 16, and the largest weights and inputs over the widest input (its
    int32 lanes are flushed to int64 before they could overflow)."""
    if int8_gemv.vnni_library() is None:
        pytest.skip("needs AVX512-VNNI (and a C compiler)")
    avx2 = int8_gemv.Avx2Estimator(int8_gemv.library())
    vnni = int8_gemv.VnniEstimator(int8_gemv.library(), int8_gemv.vnni_library())
    g = torch.Generator().manual_seed(9)
    for vocab, k, rows in ((301, 96, 40), (37, 640, 7), (20, int8_gemv.MAX_K, 3)):
        q = torch.randint(-127, 128, (vocab, k), generator=g, dtype=torch.int8)
        scale = torch.rand(vocab, generator=g) + 0.5
        x = torch.randn(rows, k, generator=g)
        if k == int8_gemv.MAX_K:
            q[:] = 127
            q[1] = -127
            x[:] = 1.0  # every x rounds to 32767: each sum is 4096 * 127 * 32767, past int32
        xq = avx2.quantize(x.contiguous())
        for n in range(1, rows + 1):
            want, got = torch.empty(n, vocab), torch.empty(n, vocab)
            part = int8_gemv.Quantized(xq.xq[:n], xq.sx[:n], xq.ex[:n])
            avx2.run(avx2.pack(q), scale, part, want)
            vnni.run(vnni.pack(q), scale, part, got)
            assert torch.equal(got, want), (vocab, k, n)
        if k == int8_gemv.MAX_K:
            exact = (4096 * 127 * 32767 * xq.sx[0] * scale[0].double()).float()
            assert got[0, 0] == exact and got[0, 1] == -(4096 * 127 * 32767 * xq.sx[0] * scale[1].double()).float()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_greedy_tokens_are_the_same_with_and_without_it(make_engine, run, collect, request_for, monkeypatch,
                                                               dtype):
    """Tiny engine: greedy requests take the int8 head and give the tokens the full head gives; a
    logprobs request (and any sampling row) still sees the full logits."""
    used = []
    real = GreedyHead.pieces
    monkeypatch.setattr(GreedyHead, "pieces", lambda self, hs, chunk: used.append(len(hs)) or real(self, hs, chunk))
    prompts = [[2, 10 + i, 400 + 7 * i, 33, 9 + i] for i in range(4)]

    def outputs(engine, **kw):
        async def go():
            import asyncio

            done = await asyncio.gather(*(collect(engine, request_for(p, 12, rid=f"r{i}", **kw))
                                          for i, p in enumerate(prompts)))
            return [result for _, result in done]
        return run(go())

    with_head = make_engine(dtype=dtype)
    assert with_head.runner.greedy_head is not None
    fast = outputs(with_head)
    assert used, "greedy rows did not take the int8 head"
    without = make_engine(dtype=dtype, cpu_greedy_head=False)
    assert without.runner.greedy_head is None
    assert [r.token_ids for r in fast] == [r.token_ids for r in outputs(without)]
    used.clear()
    with_lp = outputs(with_head, logprobs=True, top_logprobs=3)
    assert not used  # logprob rows need every logit
    ref_lp = outputs(without, logprobs=True, top_logprobs=3)
    assert [r.token_ids for r in with_lp] == [r.token_ids for r in fast]
    assert [[t.top for t in r.logprobs] for r in with_lp] == [[t.top for t in r.logprobs] for r in ref_lp]
