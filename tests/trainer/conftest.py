"""Trainer test helpers: a small config factory on the tiny model and the demo data."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_DATA = REPO / "examples" / "movie_reviews.jsonl"


@pytest.fixture
def tiny_config(tiny_base, tmp_path):
    """``tiny_config(**overrides) -> TrainConfig``: a few fast steps on the demo data, no progress bar."""
    from adapterctl.trainer import TrainConfig

    def make(**overrides):
        values = dict(data=str(DEMO_DATA), output=str(tmp_path / "adapter"), base_model=str(tiny_base.path),
                      max_steps=4, batch_size=4, lr=1e-2, dropout=0.0, progress=False, seed=7)
        values.update(overrides)
        return TrainConfig(**values)

    return make
