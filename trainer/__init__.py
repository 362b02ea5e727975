"""LoRA fine-tuning: data loading, training, export of a PEFT adapter with an adapterctl manifest.

Public API::

    from adapterctl.trainer import TrainConfig, train
    result = train(TrainConfig(data="examples/movie_reviews.jsonl", output="out/reviews", max_steps=20))
    result.output_dir, result.train_loss, result.losses, result.eval_loss, result.manifest

``train`` and ``TrainResult`` import torch/transformers on first use, so importing
this package (e.g. for the CLI's option table) stays cheap.
"""
from __future__ import annotations

from typing import Any

from adapterctl.trainer.config import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "train"]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult", "TrainingInterrupted"):
        from adapterctl.trainer import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'adapterctl.trainer' has no attribute {name!r}")
