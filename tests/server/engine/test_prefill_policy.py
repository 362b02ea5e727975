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
    policy = PrefillPolicy(mode)
    assert [policy.shape(d, p) for d, p in steps] == shapes


def _piece(**kw) -> Piece:
    base = dict(top=True, decoding=True, in_layers=True, joined=False, budget=64, newcomers=True)
    return Piece(**{**base, **kw})


@pytest.mark.parametrize("piece, action", [
    (_piece(), Action.INTERLEAVE),  # a decode step pauses for newcomers
    (_piece(newcomers=False), Action.CONTINUE),
    (_piece(budget=0), Action.CONTINUE),  # this step's prefill budget is spent
    (_piece(decoding=False), Action.JOIN),  # a prefill in its layers shares its LM head
    (_piece(decoding=False, joined=True), Action.CONTINUE),  # once per forward
    (_piece(decoding=False, in_layers=False), Action.CONTINUE),  # past the final norm: too late to join
    (_piece(top=False), Action.JOIN),  # a forward inside a pause never pauses again, but takes joiners
    (_piece(top=False, joined=True), Action.CONTINUE),
])
def test_between_pieces_in_interleave_mode(piece, action):
    assert PrefillPolicy("interleave").between_pieces(piece) is action


@pytest.mark.parametrize("mode", ["separate", "mixed"])
def test_other_modes_never_act_inside_a_forward(mode):
    policy = PrefillPolicy(mode)
    assert {policy.between_pieces(_piece(**kw)) for kw in ({}, {"decoding": False}, {"top": False})} == {
        Action.CONTINUE
    }


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="prefill mode"):
        PrefillPolicy("eager")
