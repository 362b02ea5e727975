"""Per-row token selection: greedy, temperature, top-k, top-p and per-request seeds.

Reproducibility: each sampled request owns a ``torch.Generator``; a row draws exactly
one uniform number per token from it and picks by inverse CDF over its own
(sorted) distribution, so the choice never depends on batch neighbours.
"""
from __future__ import annotations

import torch

from adapterctl.server.engine import cpu_fused
from adapterctl.server.types import SamplingParams, TokenLogprob

_TOPP_PROBE = 1024  # candidates tried before falling back to a full sort for top-p


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (or a random seed when None). It stays on the
    CPU on every device: one uniform draw per token, so the stream of a seed is the same
    on CPU and CUDA."""
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


_BLOCK = 1024  # columns per block of the two-stage argmax


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` for ``x`` [rows, vocab], same index (first maximum; NaN counts as the
    maximum, as in torch). On CPU one C call (:func:`~.cpu_fused.first_max`); without it, with many
    rows a vectorised ``amax`` per block of columns, then an argmax inside each row's first block
    holding its maximum, measured ~2x faster than ``argmax`` over 64 x 262k (whose CPU kernel
    compares one element at a time)."""
    fast = cpu_fused.first_max(x) if x.device.type == "cpu" else None
    if fast is not None:
        return fast
    rows, vocab = x.shape
    if rows < 8 or vocab % _BLOCK or x.device.type != "cpu":
        return x.argmax(-1)
    blocks = x.view(rows, vocab // _BLOCK, _BLOCK)
    first = blocks.amax(-1).argmax(-1)  # [rows] first block whose max is the row's max
    inside = blocks[torch.arange(rows, device=x.device), first].argmax(-1)
    return first * _BLOCK + inside


def first_max(block: torch.Tensor, lo: int,
              best: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The running first maximum over column blocks: ``block`` [rows, n] holds columns
    ``lo .. lo + n - 1``, ``best`` (values, indices) [rows] those of the blocks before it (lower
    columns). A later block wins only when strictly greater, or NaN over a number, so after the
    last block the indices are ``argmax`` of the whole rows (first maximum, NaN the maximum)."""
    idx = argmax_rows(block)
    return merge_max(block.gather(1, idx[:, None])[:, 0], idx + lo, best)


def merge_max(val: torch.Tensor, idx: torch.Tensor,
              best: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`first_max`'s step: the first maxima ``val``/``idx`` [rows] of a block of higher
    columns than ``best``'s replace them only when strictly greater, or NaN over a number."""
    if best is None:
        return val, idx
    top, at = best
    better = (val > top) | (val.isnan() & ~top.isnan())
    return torch.where(better, val, top), torch.where(better, idx, at)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` ``[rows, vocab]``; row i uses ``params[i]``."""
    out = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    if greedy:
        idx = torch.tensor(greedy, device=logits.device)
        picks = argmax_rows(logits.index_select(0, idx) if len(greedy) < len(params) else logits).tolist()
        for i, t in zip(greedy, picks):
            out[i] = int(t)
    for i, p in enumerate(params):
        if p.temperature != 0:
            out[i] = _sample_row(logits[i], p, generators[i])
    return out


def _sample_row(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """temperature -> top-k -> top-p (HF's order), then inverse CDF with one uniform draw."""
    scaled = row.float() / p.temperature
    vocab = scaled.shape[-1]
    k = p.top_k if 0 < p.top_k < vocab else vocab
    if k < vocab:
        values, index = _top(scaled, k)
        logz = torch.logsumexp(values, dim=-1)
    else:
        logz = torch.logsumexp(scaled, dim=-1)
        values, index = scaled, None  # full, unsorted distribution
    if p.top_p < 1.0:
        probe = min(k, _TOPP_PROBE)
        values, index = _top(scaled, probe)
        cum = torch.cumsum(torch.exp(values - logz), dim=-1)
        if probe < k and float(cum[-1]) < p.top_p:  # the probe did not reach top_p: sort all k
            values, index = _top(scaled, k)
            cum = torch.cumsum(torch.exp(values - logz), dim=-1)
        # the smallest prefix whose mass reaches top_p (at least one token)
        probe_p = torch.tensor([p.top_p], dtype=cum.dtype, device=cum.device)
        keep = min(int(torch.searchsorted(cum, probe_p).item()) + 1, len(cum))
        values, index = values[:keep], index[:keep]
    cdf = torch.cumsum(torch.exp(values - logz), dim=-1)
    u = torch.rand(1, generator=gen, dtype=torch.float64).item() * float(cdf[-1])
    probe_u = torch.tensor([u], dtype=cdf.dtype, device=cdf.device)
    pick = min(int(torch.searchsorted(cdf, probe_u, right=True).item()), len(cdf) - 1)
    return pick if index is None else int(index[pick])


def _top(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k values (descending, ties by lower index first) and their indices."""
    if k >= x.shape[-1]:
        return torch.sort(x, descending=True, stable=True)
    return torch.topk(x, k, sorted=True)


def select(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           masks: list[torch.Tensor | None] | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """:func:`sample` after each row's grammar mask, plus the asked-for log-probabilities.

    ``masks[i]`` is None (unconstrained) or a bool ``[vocab]`` of allowed tokens; masked
    rows get -inf elsewhere, in place. Unmasked rows are untouched, so their choice is
    what :func:`sample` alone picks. Row i's logprobs are ``log_softmax(logits[i] / T)``
    (T = temperature, 1 when greedy) before top-k / top-p."""
    if masks is not None:
        for i, mask in enumerate(masks):
            if mask is not None:
                logits[i].masked_fill_(~mask.to(logits.device), float("-inf"))
    tokens = sample(logits, params, generators)
    out: list[TokenLogprob | None] = [None] * len(params)
    for i, p in enumerate(params):
        if p.logprobs:
            out[i] = token_logprob(logits[i], tokens[i], p)
    return tokens, out


def token_logprob(row: torch.Tensor, token: int, p: SamplingParams) -> TokenLogprob:
    """``token``'s log-probability in ``row`` ``[vocab]`` after temperature, with the top alternatives."""
    logp = torch.log_softmax(row.float() / (p.temperature or 1.0), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if p.top_logprobs:
        values, index = _top(logp, p.top_logprobs)
        top = tuple((int(t), float(v)) for t, v in zip(index.tolist(), values.tolist()))
    return TokenLogprob(int(token), float(logp[token]), top)
