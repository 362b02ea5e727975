"""Batching: a list-backed dataset, right-padding and padding-free (packed) collators.

Length grouping, when asked for, is HF's own sampler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from adapterctl.trainer.data import IGNORE_INDEX, Example


class ExampleDataset(Dataset):
    """Examples as dicts of python lists (what the collator expects)."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}

    def lengths(self) -> list[int]:
        return [len(ex.input_ids) for ex in self.examples]


@dataclass
class RightPadCollator:
    """Pads to the longest record of the batch (rounded up to ``pad_to_multiple_of``), on the right.

    Returns ``input_ids`` [B, T] (pad_id beyond each record), ``attention_mask`` [B, T]
    (1 on real tokens) and ``labels`` [B, T] (-100 on padding).
    """

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(f["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}



@dataclass
class PaddingFreeCollator:
    """Concatenates a batch's records into one row: ``input_ids``, ``position_ids`` and
    ``labels`` of shape [1, N] (N = total tokens), positions restarting at 0 per record and
    the label of each record's first token set to -100, with no ``attention_mask``.

    Transformers then builds a block-diagonal causal mask from the position ids, so each
    record attends only to itself: same batches, same loss as right padding, but no compute
    on padding. Batches over ``max_packed_tokens`` are right-padded instead, because a packed
    row's attention cost grows with N squared.
    """

    pad_id: int
    max_packed_tokens: int = 2048

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        total = sum(len(f["input_ids"]) for f in features)
        if len(features) == 1 or total > self.max_packed_tokens:
            return RightPadCollator(self.pad_id)(features)
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for f in features:
            input_ids.extend(f["input_ids"])
            labels.append(IGNORE_INDEX)  # never predicted across a record boundary
            labels.extend(f["labels"][1:])
            positions.extend(range(len(f["input_ids"])))
        return {"input_ids": torch.tensor([input_ids], dtype=torch.long),
                "position_ids": torch.tensor([positions], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long)}
