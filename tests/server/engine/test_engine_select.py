"""``sampling.select``: grammar masks touch only their own rows, and logprobs are the
log-softmax after temperature of the row that was sampled from."""
from __future__ import annotations

import pytest
import torch

from adapterctl.errors import InvalidArgument
from adapterctl.server.engine.sampling import argmax_rows, first_max, make_generator, sample, select
from adapterctl.server.types import ResponseFormat, SamplingParams


def test_masks_only_change_their_rows_and_logprobs_follow_temperature():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    params = [SamplingParams(), SamplingParams(logprobs=True, top_logprobs=3),
              SamplingParams(temperature=0.5, seed=1, logprobs=True), SamplingParams(temperature=0.8, seed=2)]
    gens = [None, None, make_generator(1), make_generator(2)]
    plain = sample(logits.clone(), params, [None, None, make_generator(1), make_generator(2)])
    allowed = torch.zeros(50, dtype=torch.bool)
    allowed[[7, 11]] = True
    masked = logits.clone()
    tokens, lps = select(masked, params, gens, [None, allowed, None, None])
    assert tokens[0] == plain[0] and tokens[2] == plain[2] and tokens[3] == plain[3]
    assert torch.equal(masked[[0, 2, 3]], logits[[0, 2, 3]])  # unconstrained rows untouched
    assert tokens[1] in (7, 11) and tokens[1] == int(logits[1, [7, 11]].argmax() * 4 + 7)
    assert lps[0] is None and lps[3] is None
    ref = torch.log_softmax(logits[1].masked_fill(~allowed, float("-inf")), -1)
    assert lps[1].logprob == pytest.approx(float(ref[tokens[1]]), abs=1e-6)
    assert [t for t, _ in lps[1].top[:2]] == ref.topk(2).indices.tolist() and lps[1].top[2][1] == float("-inf")
    ref = torch.log_softmax(logits[2] / 0.5, -1)
    assert lps[2].logprob == pytest.approx(float(ref[tokens[2]]), abs=1e-6) and lps[2].top == ()


@pytest.mark.parametrize("params", [SamplingParams(top_logprobs=2), SamplingParams(logprobs=True, top_logprobs=21)])
def test_top_logprobs_bounds(params):
    with pytest.raises(InvalidArgument):
        params.validate(10)


def test_response_format_validation():
    assert ResponseFormat("text").validate() is None
    assert ResponseFormat("json_schema", '{"type": "object"}').validate().schema == {"type": "object"}
    assert ResponseFormat("json_object", "ignored").validate().schema is None
    for bad in (ResponseFormat("xml"), ResponseFormat("json_schema"), ResponseFormat("json_schema", "{nope"),
                ResponseFormat("json_schema", "[1]")):
        with pytest.raises(InvalidArgument):
            bad.validate()


@pytest.mark.parametrize("kernel", [True, False], ids=["c-kernel", "aten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 37])
def test_argmax_rows_is_torch_argmax_with_ties_and_nan(rows, dtype, kernel, monkeypatch):
    """Both ways argmax_rows takes on CPU: cpu_fused's C kernel (where it builds) and ATen's ops."""
    from adapterctl.server.engine import cpu_fused

    if not kernel:
        monkeypatch.setattr(cpu_fused, "first_max", lambda x: None)
    elif cpu_fused.library() is None:
        pytest.skip("needs the C kernel (a C compiler and an AVX2 x86-64 CPU)")
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 8192, generator=g).to(dtype)
    x[0, 5000] = x[0, 7000] = 99.0  # tie across blocks: the first wins
    if rows > 1:
        x[1, 3] = x[1, 1020] = 99.0  # tie inside a block
    if rows > 2:
        x[2, 6000] = float("nan")  # NaN counts as the maximum
        x[2, 100] = float("inf")
    if rows > 3:
        x[3] = float("-inf")  # all equal: index 0
    assert torch.equal(argmax_rows(x), x.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_max_over_blocks_is_argmax_of_the_whole_row(dtype):
    """The running first maximum the engine keeps over LM-head slices: ties across blocks keep the
    earlier block, NaN wins over numbers and the first NaN stays, a row of -inf gives index 0."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 5 * 2048, generator=g).to(dtype)
    x[0, 100] = x[0, 9000] = 50  # tie across blocks
    x[1, 4096] = x[1, 4097] = 50  # tie inside a block
    x[2, 7000] = float("nan")
    x[2, 9500] = float("nan")  # a later NaN does not replace the first
    x[2, 10] = float("inf")
    x[3] = float("-inf")
    x[4, 2047], x[4, 2048] = 40, 40  # tie on a block edge
    x[5, -1] = 60  # the maximum in the last block
    for widths in ([2048] * 5, [1024, 3072, 2048, 4096], [5 * 2048]):
        best, lo = None, 0
        for n in widths:
            best = first_max(x[:, lo: lo + n], lo, best)
            lo += n
        assert torch.equal(best[1], x.argmax(-1)), widths
        same = (best[0] == x.amax(-1)) | (best[0].isnan() & x.isnan().any(-1))
        assert bool(same.all())
