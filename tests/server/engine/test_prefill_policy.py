"""The prefill-mode policy on its own (no model): step shapes per mode, including the
'separate' alternation, and what a running forward does between pieces."""
from __future__ import annotations

import pytest

from adapterctl.server.engine.prefill import Action, Piece, PrefillPolicy, StepShape

DECODE, PREFILL, BOTH = StepShape(True, False), StepShape(False, True), StepShape(True, True)


@pytest.mark.parametrize("mode, steps, shapes", [
    # (decoding rows?, prompts in prefill?) per step -> shape of each step
    ("interleave", [(True, True), (True, True), (False, True), (True, False)], [DECODE, DECODE, PREFILL, DECODE]),
    ("separate", [(True, True), (True, True), (True, True), (False, True)], [PREFILL, DECODE, PREFILL, PREFILL]),
    ("separate", [(True, False), (True, True), (True, True)], [DECODE, PREFILL, DECODE]),
    ("mixed", [(True, True), (False, True), (True, False)], [BOTH, BOTH, BOTH]),
])
def test_step_shapes(mode, steps, shapes):
    policy = PrefillPolicy(mode, 0.4)
    assert [policy.shape(d, p) for d, p in steps] == shapes


def _piece(**kw) -> Piece:
    base = dict(top=True, decoding=True, in_layers=True, progress=0.25, budget=64, newcomers=True)
    return Piece(**{**base, **kw})


@pytest.mark.parametrize("piece, action", [
    (_piece(), Action.INTERLEAVE),  # a decode step pauses for newcomers
    (_piece(newcomers=False), Action.CONTINUE),
    (_piece(budget=0), Action.CONTINUE),  # this step's prefill budget is spent
    (_piece(decoding=False), Action.MERGE),  # a prefill early in its layers carries them from here on
    (_piece(decoding=False, progress=0.4), Action.MERGE),  # up to merge_until, inclusive
    (_piece(decoding=False, progress=0.45), Action.CONTINUE),  # later: newcomers wait for their own forward
    (_piece(decoding=False, in_layers=False, progress=1.0), Action.CONTINUE),  # past the final norm
    (_piece(top=False), Action.MERGE),  # a forward inside a pause never pauses again, but merges
    (_piece(top=False, progress=0.9), Action.CONTINUE),
])
def test_between_pieces_in_interleave_mode(piece, action):
    assert PrefillPolicy("interleave", 0.4).between_pieces(piece) is action


@pytest.mark.parametrize("mode, top, decoding, serves", [
    ("interleave", True, True, True),  # a decode step pauses for newcomers, its LM head included
    ("interleave", False, True, False),  # a forward inside a pause never pauses again
    ("interleave", True, False, False),  # a prefill only merges newcomers, before its final norm
    ("separate", True, True, False),
    ("mixed", True, True, False),
])
def test_serves_during_head_matches_between_pieces(mode, top, decoding, serves):
    """The LM head stops for a newcomer exactly where the policy would then serve one."""
    policy = PrefillPolicy(mode, 0.4)
    assert policy.serves_during_head(top, decoding) is serves
    past_layers = _piece(top=top, decoding=decoding, in_layers=False, progress=1.0)
    assert (policy.between_pieces(past_layers) is not Action.CONTINUE) is serves


@pytest.mark.parametrize("merge_until, progress, action", [
    (0.0, 0.05, Action.CONTINUE),  # 0: never merge
    (1.0, 1.0, Action.MERGE),  # 1: up to the final norm (the forward is still in its layers)
])
def test_merge_until_bounds(merge_until, progress, action):
    piece = _piece(decoding=False, progress=progress)
    assert PrefillPolicy("interleave", merge_until).between_pieces(piece) is action


@pytest.mark.parametrize("mode", ["separate", "mixed"])
def test_other_modes_never_act_inside_a_forward(mode):
    policy = PrefillPolicy(mode, 0.4)
    assert {policy.between_pieces(_piece(**kw)) for kw in ({}, {"decoding": False}, {"top": False})} == {
        Action.CONTINUE
    }


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="prefill mode"):
        PrefillPolicy("eager", 0.4)
