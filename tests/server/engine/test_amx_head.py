"""The bf16 LM head on AMX tiles (server/engine/amx_head.c through amx_head.py): logits within
fp32-sum rounding of exact ones (exact on small integers), the argmax mode the first maximum of
the logits mode's own output across vocabulary pairs, slices and threads, what it does not take
refused, and a runner's bf16 steps giving the same tokens and logits as with oneDNN's head.
Skipped where the CPU has no AMX-BF16 (most CI hosts): there the runner never takes it."""
from __future__ import annotations

import pytest
import torch

from adapterctl.server.engine import amx_head

pytestmark = pytest.mark.skipif(amx_head.library() is None, reason="needs AMX-BF16 and a compiler that knows AMX")


@pytest.mark.parametrize("rows", [5, 16, 17, 40, 64])
def test_logits_are_exact_on_integers_and_close_on_real_values(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randint(-6, 7, (1000, 96), generator=g).bfloat16()  # n not a multiple of 32
    x = torch.randint(-5, 6, (rows, 96), generator=g).bfloat16()
    part = amx_head.prepare(w)
    assert part is not None
    assert torch.equal(amx_head.linear(x, part), (x.double() @ w.double().T).bfloat16())
    w, x = torch.randn(1000, 96, generator=g).bfloat16(), torch.randn(rows, 96, generator=g).bfloat16()
    got = amx_head.linear(x, amx_head.prepare(w)).float()
    want = (x.double() @ w.double().T).float()
    assert torch.allclose(got, want, rtol=2 ** -7, atol=1e-3)  # bf16's rounding, fp32 sums


@pytest.mark.parametrize("rows", [5, 33, 64])
def test_first_max_is_argmax_of_its_own_logits_with_ties_everywhere(rows):
    """Ties inside a 16-row block, across the two blocks of a pair, across pairs and across the two
    threads' halves of the vocabulary; the first (lowest index) always wins."""
    g = torch.Generator().manual_seed(7)
    n, k = 4099, 64
    w = torch.randint(-2, 3, (n, k), generator=g).bfloat16()
    x = torch.randint(-2, 3, (rows, k), generator=g).bfloat16()
    for v in (3, 9, 20, 40, 2100, 4098):  # the same top row at several places
        w[v] = 4.0
    x[:, :] = x.abs() + 1  # every row's largest logit is at those rows
    part = amx_head.prepare(w)
    logits = amx_head.linear(x, part)
    got = amx_head.first_max(x, part)
    assert got is not None
    val, idx = got
    assert torch.equal(idx, logits.argmax(-1)) and (idx == 3).all()
    assert torch.equal(val, logits.gather(1, idx[:, None])[:, 0])
    x = torch.randn(rows, k, generator=g).bfloat16()  # and on real values
    val, idx = amx_head.first_max(x, part)
    assert torch.equal(idx, amx_head.linear(x, part).argmax(-1))


def test_what_it_does_not_take_is_refused():
    w = torch.randn(64, 64).bfloat16()
    assert amx_head.prepare(w.float()) is None
    assert amx_head.prepare(torch.randn(64, 48).bfloat16()) is None  # k not a multiple of 32
    assert amx_head.prepare(w.t()) is None  # not contiguous
    part = amx_head.prepare(w)
    assert amx_head.first_max(torch.randn(4, 64).bfloat16(), part) is None  # 1-4 rows: the GEMV's
    x = torch.randn(6, 64).bfloat16()
    x[2, 5] = float("nan")
    assert amx_head.first_max(x, part) is None  # a NaN logit: the caller reduces the logits
    small = torch.randn(3, 64).bfloat16()
    assert torch.allclose(amx_head.linear(small, part).float(), (small.float() @ w.float().T), rtol=2 ** -7,
                          atol=1e-3)


def test_runner_steps_match_onednns_head(tiny_base, monkeypatch):
    """bf16 decode steps with the head in AMX slices give the tokens (argmax-only rows) and logits
    (sampled rows) of the same runner with oneDNN's head, on the tiny model's 262k vocabulary."""
    from adapterctl.basemodel import load_model
    from adapterctl.server.engine.runner import Chunk, ModelRunner

    args = dict(max_rows=8, max_positions=64, num_slots=1, max_rank=4, lora_modules=("q_proj",), greedy_head=False)
    amx = ModelRunner(load_model(tiny_base, "cpu", "bfloat16"), **args)
    assert amx.head_parts is not None and all(isinstance(op, amx_head.Part) for _, _, op in amx.head_parts)
    monkeypatch.setattr(amx_head, "prepare", lambda w: None)
    ref = ModelRunner(load_model(tiny_base, "cpu", "bfloat16"), **args)
    assert not any(isinstance(op, amx_head.Part) for _, _, op in ref.head_parts)
    rows = 7
    with torch.inference_mode():
        for r in (amx, ref):
            for i in range(rows):
                r.kv.alloc_row(32)
        for step, argmax_only in enumerate((False, True, True, False)):
            got = []
            for r in (amx, ref):
                chunks = [Chunk(i, 0, [2, 100 + i, 7], 0, True, argmax_only) if step == 0
                          else Chunk(i, 2 + step, [300 + i + step], 0, True, argmax_only) for i in range(rows)]
                fwd = r.start(chunks)
                while fwd.step():
                    pass
                got.append(fwd.tokens if argmax_only else fwd.logits)
            if argmax_only:
                assert got[0] == got[1]
            else:
                assert torch.equal(got[0], got[1])
