"""p5's counted step floor and its first-token reading (no model, no timing)."""
from __future__ import annotations

import pytest

from bench.cache_bench import _first_token_s, _min_steps
from bench.common import Timed


@pytest.mark.parametrize("adapters, requests, slots, rows, floor", [
    (117, 256, 16, 64, 256),  # p5's Zipf draw: 8 adapters in turn on some slot, 32 steps each
    (16, 256, 16, 64, 128),  # p5's hot run: rows bound it (256 x 32 tokens over 64 rows)
    (16, 16, 16, 64, 32),  # every request at once
    (17, 17, 16, 64, 64),  # one adapter too many: a second turn on one slot
])
def test_min_steps_is_the_larger_of_the_slot_and_row_floors(adapters, requests, slots, rows, floor):
    assert _min_steps(adapters, requests, 32, slots, rows) == floor


def test_first_token_counts_from_the_first_submission_to_the_first_token_of_any_request():
    recs = [Timed(10.0, first=14.5), Timed(10.2, first=11.7), Timed(10.1, first=None)]  # one never streamed
    assert _first_token_s(recs) == pytest.approx(1.7)
