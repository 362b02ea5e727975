"""Unit checks of the engine's building blocks: LoRA backends agree with the formula,
batch metadata, KV row compaction, slot banks and sampling rules."""
from __future__ import annotations

import pytest
import torch

from adapterctl.server.engine.batch import LoraBatch
from adapterctl.server.engine.kv import KVCache
from adapterctl.server.engine.lora import BACKENDS, LoraWeights, make_backend
from adapterctl.server.engine.sampling import make_generator, sample
from adapterctl.server.types import SamplingParams


def _bank(num_slots=4, max_rank=16, d_in=24, d_out=40, ranks=(0, 4, 16, 0, 8)) -> LoraWeights:
    g = torch.Generator().manual_seed(0)
    a = torch.zeros(num_slots + 1, max_rank, d_in)
    b = torch.zeros(num_slots + 1, d_out, max_rank)
    for s, r in enumerate(ranks):
        if s and r:
            a[s, :r] = torch.randn(r, d_in, generator=g)
            b[s, :, :r] = torch.randn(d_out, r, generator=g)
    scale = torch.tensor([0.0, 2.0, 0.5, 1.0, 0.25])
    return LoraWeights(a, b.transpose(1, 2).contiguous(), scale, list(ranks))


def _took_the_kernel(calls, backend, token_slots) -> None:
    """With the C kernel, "gather" took it for every call and "auto" for its decode tokens."""
    if calls is None:
        return
    short = backend == "gather" or (backend == "auto" and any(
        token_slots.count(s) < 8 for s in set(token_slots) if s))
    if short and any(token_slots):
        assert calls and all(calls)
    if backend == "segment":
        assert calls == []


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("token_slots", [
    [1, 2, 4, 3, 0],  # one token per adapter (decode)
    [1, 2, 3, 4],  # consecutive slots, one token each (sliced, not gathered)
    [0, 0, 2, 2, 2, 2, 2, 2, 1, 4, 4, 4, 4, 4],  # long and short runs (prefill + decode)
    [0, 0, 0],  # no adapter at all
    [2, 2, 2, 2, 2, 2],  # one adapter, every token
    [0] * 3 + [4] * 40 + [1, 3],  # a prefill-length run (segment matmul in "auto") next to decode rows
    [1] * 8 + [2] * 3 + [3] * 9,  # runs on both sides of the auto threshold
])
def test_backends_match_the_formula(backend, token_slots, kernel):
    w = _bank()
    x = torch.randn(len(token_slots), 24, generator=torch.Generator().manual_seed(1))
    y0 = torch.randn(len(token_slots), 40, generator=torch.Generator().manual_seed(2))
    want = y0.clone()
    for t, s in enumerate(token_slots):
        want[t] += w.scale[s] * (x[t] @ w.A[s].T) @ w.Bt[s]
    y = y0.clone()
    make_backend(backend).apply(y, x, w, LoraBatch.from_token_slots(token_slots))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    _took_the_kernel(kernel, backend, token_slots)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("token_slots", [[1, 2, 4, 3, 0], [1, 2, 3, 4], [2] * 9 + [1, 4]])
def test_bf16_deltas_are_scaled_as_peft_scales_them(backend, token_slots, kernel):
    """In bf16 a delta is PEFT's ``lora_B(lora_A(x)) * scaling``: times the Python float, i.e. in
    fp32, not a bf16 copy of it. Scales bf16 cannot hold (4/3 -> 1.3359, 0.3, 1.1, 0.7) and
    integer weights and inputs (so every sum is exact in any order and only the roundings PEFT
    makes can differ): the outputs are bitwise PEFT's."""
    g = torch.Generator().manual_seed(5)
    ranks, scales = (0, 4, 16, 0, 8), (0.0, 4 / 3, 0.3, 1.1, 0.7)
    d_out = 72  # the C kernel's 64-column blocks and its scalar tail
    a = torch.zeros(5, 16, 24)
    bt = torch.zeros(5, 16, d_out)
    for slot, r in enumerate(ranks):
        a[slot, :r] = torch.randint(-3, 4, (r, 24), generator=g).float()
        bt[slot, :r] = torch.randint(-3, 4, (r, d_out), generator=g).float()
    w = LoraWeights(a.bfloat16(), bt.bfloat16(), torch.tensor(scales), list(ranks))
    x = torch.randint(-3, 4, (len(token_slots), 24), generator=g).bfloat16()
    y0 = torch.randn(len(token_slots), d_out, generator=g).bfloat16()
    want = y0.clone()
    for t, s in enumerate(token_slots):
        if ranks[s]:
            h = (x[t].float() @ a[s].T).bfloat16()  # lora_A(x), exact then rounded
            want[t] += (h.float() @ bt[s]).bfloat16() * scales[s]  # lora_B(...) * scaling, then PEFT's add
    y = y0.clone()
    make_backend(backend).apply(y, x, w, LoraBatch.from_token_slots(token_slots))
    assert torch.equal(y, want)
    _took_the_kernel(kernel, backend, token_slots)
    bf16_scale = y0.clone()  # the same with the scale rounded to bf16 first: not PEFT's (the test can fail)
    for t, s in enumerate(token_slots):
        if ranks[s]:
            h = (x[t].float() @ a[s].T).bfloat16()
            bf16_scale[t] += (h.float() @ bt[s]).bfloat16() * torch.tensor(scales[s]).bfloat16()
    assert not torch.equal(bf16_scale, want)


def test_the_cpu_lora_kernel_declines_a_bf16_width_it_does_not_take():
    """bf16 inputs not a multiple of 8 wide: the kernel writes nothing and says so (the backend then
    runs ATen's ops, which still give the formula)."""
    from adapterctl.server.engine import lora_cpu

    if lora_cpu.library() is None:
        pytest.skip("no CPU LoRA kernel here")
    w = _bank(d_in=20)
    a, bt = w.A.bfloat16(), w.Bt.bfloat16()
    x, y = torch.ones(2, 20).bfloat16(), torch.zeros(2, 40).bfloat16()
    assert not lora_cpu.add(y, x, a, bt, w.rank_table, w.scale, torch.tensor([1, 2]))
    assert torch.equal(y, torch.zeros(2, 40).bfloat16())
    assert lora_cpu.add(y, torch.ones(2, 24).bfloat16(), _bank().A.bfloat16(), bt, w.rank_table, w.scale,
                        torch.tensor([1, 2]))


def test_batch_metadata_segments():
    meta = LoraBatch.from_token_slots([0, 0, 3, 3, 3, 1])
    assert meta.seg_bounds == [0, 2, 5, 6] and meta.seg_slots == [0, 3, 1]
    assert meta.slots == (3, 1) and meta.lora_tokens.tolist() == [2, 3, 4, 5] and not meta.all_tokens_lora
    short = meta.short_view(2)
    assert short.slots == (1,) and short.lora_tokens.tolist() == [5] and not short.all_tokens_lora
    with pytest.raises(ValueError, match="contiguous"):
        LoraBatch.from_token_slots([1, 2, 1])


def test_kv_rows_stay_dense():
    kv = KVCache(num_layers=2, kv_heads=1, head_dim=4, max_rows=8, max_positions=64, dtype=torch.float32,
                 device=torch.device("cpu"))
    rows = [kv.alloc_row(10) for _ in range(3)]
    assert rows == [0, 1, 2]
    for r in rows:
        kv.k[0][r, :, :5] = r + 1
        kv.lengths[r] = 5
    assert kv.free_row(0) == 2  # the last row moves into the hole
    assert kv.num_rows == 2 and torch.all(kv.k[0][0, :, :5] == 3)
    assert kv.free_row(1) is None and kv.num_rows == 1
    kv.alloc_row(60)  # grows positions, keeps contents
    assert kv.pos_capacity >= 60 and torch.all(kv.k[0][0, :, :5] == 3)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]] * 4)
    g = make_generator(0)
    assert sample(logits, [SamplingParams()] * 4, [None] * 4) == [1] * 4  # greedy
    picks = [sample(logits[:1], [SamplingParams(temperature=5.0, top_k=2)], [g])[0] for _ in range(200)]
    assert set(picks) == {1, 3}
    picks = [sample(logits[:1], [SamplingParams(temperature=1.0, top_p=0.01)], [g])[0] for _ in range(50)]
    assert set(picks) == {1}
    picks = [sample(logits[:1], [SamplingParams(temperature=100.0)], [g])[0] for _ in range(300)]
    assert set(picks) == {0, 1, 2, 3, 4}
    one = [sample(logits[:1], [SamplingParams(temperature=1.0, seed=5)], [make_generator(5)])[0] for _ in range(3)]
    gen = make_generator(5)
    assert [sample(logits[:1], [SamplingParams(temperature=1.0)], [gen])[0] for _ in range(3)][0] == one[0]
