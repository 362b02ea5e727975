"""When new prompts are prefilled: the prefill-mode policy of the batching engine, in one place.

``EngineConfig.prefill_mode`` picks one of three policies:

* ``separate``: a step with prompts pending prefills only (their first token sooner), but
  never twice in a row while rows decode (decoding rows are not starved).
* ``mixed``: prompt chunks ride along with the decode rows in the same step.
* ``interleave``: a step decodes whenever rows decode; prompts that arrive meanwhile are
  prefilled *inside* the running step, between two of its pieces (a decoder layer, the
  final norm, an LM-head slice, see ``runner.Forward``):

  - the running forward is a top-level decode step -> :attr:`Action.INTERLEAVE`: it
    pauses and the newcomers' prefill runs right there (their first token does not wait
    for the decode rows' LM head);
  - the running forward is a prefill in the first ``merge_until`` of its layers
    (``EngineConfig.prefill_merge_until``) ->
    :attr:`Action.MERGE`: the newcomers run the layers it has run, alone, then ride along
    in it for the rest and its LM head. Later newcomers wait for their own forward
    (:attr:`Action.CONTINUE`). Repeatable, within the step's token budget.

  A merge saves the newcomer one forward's fixed cost (a weight pass per remaining layer and
  an LM head) but makes the forward's oldest prompt wait for the newcomer's catch-up layers
  and a wider rest. With a layer costing ``a + b*tokens`` (AVX2 host, fp32 Gemma 3 270M:
  ``a`` ~2.2 ms, ``b`` ~0.1 ms, LM head ~14 ms) the worst first-token time of the two drops
  only if the newcomer arrives within the first ~40 % of the layers (the default); past that
  it is better off waiting. Where a layer's fixed cost dominates (a GPU) the break-even is
  later, about half-way plus the LM head's share. (The join this replaced ran a newcomer's every layer before the oldest
  prompt's remaining ones, which raised the worst first-token time whenever the newcomer
  arrived more than an LM head's time after it.)

  A prefill-only step runs only when nothing decodes. Forwards started inside a pause
  (``top=False``) never pause again; they may still merge newcomers.

The policy sees only counts and flags, never the model, so it is unit-tested on its own.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from adapterctl.server.engine.config import PREFILL_MODES


class Action(enum.Enum):
    """What the engine does between two pieces of a running forward."""

    CONTINUE = "continue"  # run the next piece
    INTERLEAVE = "interleave"  # pause this forward; prefill the newcomers in a nested forward
    MERGE = "merge"  # run the newcomers up to this forward's layer, then carry them in it


@dataclass(frozen=True)
class Piece:
    """The state of a running forward between two pieces, as the policy sees it."""

    top: bool  # a step's own forward (not one started inside a pause)
    decoding: bool  # every chunk is one decode token
    in_layers: bool  # before the final norm: newcomers can still be merged in
    progress: float  # fraction of the decoder layers done, in [0, 1]
    budget: int  # prefill tokens this step may still spend on newcomers
    newcomers: bool  # prompts are waiting to be admitted or admitted but not yet prefilled


@dataclass(frozen=True)
class StepShape:
    """Which running sequences the next step feeds."""

    decode: bool  # one token for every decoding row
    prefill: bool  # prompt chunks of sequences in prefill (up to the token budget)


class PrefillPolicy:
    """The decisions of one ``prefill_mode``; :meth:`shape` keeps the one bit of state
    (whether the last step was prefill-only)."""

    def __init__(self, mode: str, merge_until: float) -> None:
        if mode not in PREFILL_MODES:
            raise ValueError(f"prefill mode must be one of {PREFILL_MODES}, got {mode!r}")
        self.mode = mode
        self.merge_until = merge_until
        self._last_was_prefill = False

    def shape(self, decoding: bool, prefilling: bool) -> StepShape:
        """The next step's shape given whether rows decode and prompts wait for prefill."""
        if self.mode == "mixed":
            return StepShape(decode=True, prefill=True)
        if self.mode == "interleave":
            prefill_only = prefilling and not decoding
        else:  # separate
            prefill_only = prefilling and not (self._last_was_prefill and decoding)
        self._last_was_prefill = prefill_only
        return StepShape(decode=not prefill_only, prefill=prefill_only)

    def serves_during_head(self, top: bool, decoding: bool) -> bool:
        """Whether a newcomer arriving during this forward's LM head is served before the head ends
        (:attr:`Action.INTERLEAVE` applies past the layers too), so the head should stop between its
        slices for one rather than run whole."""
        return self.mode == "interleave" and top and decoding

    def between_pieces(self, piece: Piece) -> Action:
        """What to do before the running forward's next piece."""
        if self.mode != "interleave" or piece.budget <= 0 or not piece.newcomers:
            return Action.CONTINUE
        if piece.top and piece.decoding:
            return Action.INTERLEAVE
        if piece.in_layers and piece.progress <= self.merge_until:
            return Action.MERGE
        return Action.CONTINUE
