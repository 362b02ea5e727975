"""The int8 greedy LM head (server/engine/greedy_head.py, gemv_i8.c): the argmax it leaves is the
full bf16 head's on every row, ties and near-ties included; its candidates' logits are bitwise the
full head's; it declines what it cannot bound; and the engine uses it only for argmax-only rows,
with the same greedy tokens as without it."""
from __future__ import annotations

import pytest
import torch

from adapterctl.server.engine import cpu_gemv, greedy_head
from adapterctl.server.engine.greedy_head import GreedyHead
from adapterctl.server.engine.kernels import torch_linear, upcast_linear

KERNELS = cpu_gemv.library() is not None and greedy_head.library() is not None
pytestmark = pytest.mark.skipif(not KERNELS, reason="needs the C kernels (a C compiler, an AVX2 x86-64 CPU)")


def _head(vocab: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, k, generator=g) * 0.05
    w[:, 0] *= 20  # a large column: an int8 row scale coarser than most of the row needs
    w[3] = torch.randn(k, generator=g) * 0.4  # the row hs[0] aims at below
    w[7] = w[3]  # exact duplicates: tied logits, the first must win
    w[vocab - 1] = w[3]
    w[11] = w[3] * (1 - 2 ** -7)  # about one bf16 ulp below row 3: a near-tie
    return w.bfloat16()


def test_argmax_and_candidate_logits_are_the_full_heads():
    w = _head(8192 + 5, 64, 0)
    head = GreedyHead.build(w, None, None, upcast_linear)
    assert head is not None
    g = torch.Generator().manual_seed(1)
    seen = 0
    for trial in range(40):
        rows = 1 + trial % 5
        hs = (torch.randn(rows, 64, generator=g) * (0.3 + trial)).bfloat16()
        hs[0] = w[3] * (1 + trial)  # aims at the tied rows 3, 7, vocab - 1 and the near-tie 11
        full = cpu_gemv.linear(hs, w)
        sparse = head.logits(hs)
        assert sparse is not None and sparse.dtype == torch.bfloat16 and sparse.shape == full.shape
        assert torch.equal(sparse.argmax(-1), full.argmax(-1))
        kept = torch.isfinite(sparse)
        assert torch.equal(sparse[kept], full[kept])  # bitwise, not just the same argmax
        assert bool((kept.sum(-1) >= 1).all()) and int(kept.sum()) < full.numel() // 20
        seen += int(kept[0, 3]) + int(kept[0, 7]) + int(kept[0, -1])
        assert int(full[0].argmax()) == 3
    assert seen == 120  # the tied rows were always kept, so the first of them wins as on the full row


def test_bound_holds_on_every_logit():
    """The bound itself, not only its argmax: |estimate - exact| <= d for every vocabulary row,
    with d as the module docstring states it (weights' and x's rounding, bf16's half ulp)."""
    w = _head(4096 + 3, 128, 2)
    head = GreedyHead.build(w, None, None, upcast_linear)
    g = torch.Generator().manual_seed(3)
    hs = (torch.randn(7, 128, generator=g) * 5).bfloat16()
    hs[2, 9] = 300  # one large activation: x's int16 step is coarse for the rest of its row
    got = head.estimate(hs)
    assert got is not None
    est, ex = got
    exact = cpu_gemv.linear(hs, w).float()
    x1 = hs.float().abs().sum(-1, keepdim=True)
    bound = head.coef[None, :] * x1 + head.qa[None, :] * ex[:, None] + est.abs() * greedy_head.REL
    assert bool(((est - exact).abs() <= bound).all())
    assert float((est - exact).abs().max()) > 0  # an estimate, so the test is not vacuous
    assert float(ex[2]) > 10 * float(ex[0]) > 0  # x's rounding is measured per row


def _exact_int8_head(vocab: int, k: int, seed: int) -> torch.Tensor:
    """Weights q / 64 with integer q, |q| <= 127 and 127 in column 0 of every row: the int8 copy
    is exact (scale 1/64), so only x's rounding, the sums and bf16's rounding remain."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (vocab, k), generator=g).float()
    q[:, 0], q[:, 1] = 127, 0
    return (q / 64).bfloat16()


def test_each_term_of_the_bound_is_needed():
    """Two heads on which one term of d is most of the error: without it the bound fails on some
    logit, with it the bound holds on all (so a term made too small fails this test)."""
    w = _exact_int8_head(64, 64, 5)
    head = GreedyHead.build(w, None, None, upcast_linear)
    x1_term = lambda hs: head.coef[None, :] * hs.float().abs().sum(-1, keepdim=True)  # noqa: E731
    # x's int16 rounding: an outlier where w is 0 makes the int16 step ~2^-4, and every other
    # element is 2^-5 with w's sign, so each rounds to 0 with the error aligned to w
    hs = (torch.sign(w[:8].float()) * 2.0 ** -5).bfloat16()
    hs[:, 1] = 2048
    est, ex = head.estimate(hs)
    err = (est - cpu_gemv.linear(hs, w).float()).abs()
    rel = est.abs() * greedy_head.REL
    assert bool((err <= x1_term(hs) + head.qa[None, :] * ex[:, None] + rel).all())
    assert bool((err > x1_term(hs) + rel).any())
    # bf16's rounding of large logits: x = w's signs, exact in int16, so only the sums and the
    # final bf16 rounding are left
    hs = torch.sign(w[8:16].float()).bfloat16()
    est, ex = head.estimate(hs)
    err = (est - cpu_gemv.linear(hs, w).float()).abs()
    rest = x1_term(hs) + head.qa[None, :] * ex[:, None]
    assert bool((err <= rest + est.abs() * greedy_head.REL).all())
    assert bool((err > rest).any())


def test_declines_what_it_cannot_bound():
    w = _head(256, 64, 4)
    assert GreedyHead.build(w.float(), None, None, upcast_linear) is None  # fp32 head
    assert GreedyHead.build(w, torch.zeros(256).bfloat16(), None, upcast_linear) is None  # bias
    assert GreedyHead.build(w, None, 30.0, upcast_linear) is None  # softcapped logits
    assert GreedyHead.build(w, None, None, torch_linear) is None  # full head not on the C GEMV
    assert GreedyHead.build(_head(256, 40, 4), None, None, upcast_linear) is None  # k % 16
    assert GreedyHead.build(_head(16, greedy_head.MAX_K + 16, 4), None, None, upcast_linear) is None  # int32 lanes
    head = GreedyHead.build(w, None, None, upcast_linear)
    bad = torch.ones(2, 64).bfloat16()
    bad[1, 5] = float("inf")
    assert head.logits(bad) is None  # the caller runs the full head
    assert head.takes(cpu_gemv.MAX_ROWS) and not head.takes(cpu_gemv.MAX_ROWS + 1)


def test_engine_greedy_tokens_are_the_same_with_and_without_it(make_engine, run, collect, request_for, monkeypatch):
    """bf16 tiny engine: greedy requests take the int8 head and give the tokens the full head
    gives; a logprobs request (and any sampling row) still sees the full logits."""
    used = []
    real = GreedyHead.logits
    monkeypatch.setattr(GreedyHead, "logits", lambda self, hs: used.append(len(hs)) or real(self, hs))
    prompts = [[2, 10 + i, 400 + 7 * i, 33, 9 + i] for i in range(4)]

    def outputs(engine, **kw):
        async def go():
            import asyncio

            done = await asyncio.gather(*(collect(engine, request_for(p, 12, rid=f"r{i}", **kw))
                                          for i, p in enumerate(prompts)))
            return [result for _, result in done]
        return run(go())

    with_head = make_engine(dtype="bfloat16")
    assert with_head.runner.greedy_head is not None
    fast = outputs(with_head)
    assert used, "greedy rows did not take the int8 head"
    without = make_engine(dtype="bfloat16", cpu_greedy_head=False)
    assert without.runner.greedy_head is None
    assert [r.token_ids for r in fast] == [r.token_ids for r in outputs(without)]
    used.clear()
    with_lp = outputs(with_head, logprobs=True, top_logprobs=3)
    assert not used  # logprob rows need every logit
    ref_lp = outputs(without, logprobs=True, top_logprobs=3)
    assert [r.token_ids for r in with_lp] == [r.token_ids for r in fast]
    assert [[t.top for t in r.logprobs] for r in with_lp] == [[t.top for t in r.logprobs] for r in ref_lp]
