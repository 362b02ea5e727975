"""Batching: a list-backed dataset and a right-padding collator (length grouping is HF's sampler)."""
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

