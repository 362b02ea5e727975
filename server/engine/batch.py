"""Per-step batch metadata: which LoRA slot each token of the packed batch uses.

The model runner sets one :class:`LoraBatch` for the duration of a forward
(:func:`use_batch`); every LoRA-aware linear reads it with :func:`current_batch`.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

NO_SLOT = 0  # slot 0 is reserved: "no adapter" (its weights stay zero)


@dataclass
class LoraBatch:
    """Token -> slot mapping of one forward over a packed batch of ``num_tokens``.

    Invariant: tokens with the same slot are contiguous (the scheduler orders
    sequences by slot), so ``seg_bounds`` describes runs of equal slots.
    """

    token_slots: torch.Tensor  # [num_tokens] int64, NO_SLOT = base model only
    seg_bounds: list[int]  # [num_segments + 1] token offsets; segment i = tokens seg_bounds[i]:seg_bounds[i+1]
    seg_slots: list[int]  # [num_segments] slot of each segment (NO_SLOT allowed)
    lora_tokens: torch.Tensor  # [num_lora_tokens] int64 indices of tokens whose slot != NO_SLOT
    lora_token_slots: torch.Tensor  # [num_lora_tokens] int64 their slots
    slots: tuple[int, ...]  # distinct non-zero slots present in this batch
    partial: bool = False  # True for a view where some adapter tokens were left out
    _views: dict = field(default_factory=dict, repr=False)  # memoised derived views

    @property
    def num_tokens(self) -> int:
        return int(self.token_slots.numel())

    @property
    def has_lora(self) -> bool:
        return bool(self.slots)

    @property
    def slot_run_start(self) -> int | None:
        """``s0`` when token ``i`` uses slot ``s0 + i`` for every token (one token per
        slot, consecutive slots) — then slot banks can be sliced instead of gathered."""
        if "run" not in self._views:
            n, slots = self.num_tokens, self.seg_slots
            ok = n > 0 and len(slots) == n and slots[0] != NO_SLOT and slots[-1] - slots[0] == n - 1 and all(
                b - a == 1 for a, b in zip(slots, slots[1:]))
            self._views["run"] = slots[0] if ok else None
        return self._views["run"]

    @property
    def all_tokens_lora(self) -> bool:
        """True when every token uses some adapter (no index gather/scatter needed)."""
        return not self.partial and int(self.lora_tokens.numel()) == self.num_tokens

    def short_view(self, min_tokens: int) -> "LoraBatch | None":
        """The same batch restricted to adapter segments shorter than ``min_tokens``
        (longer ones become NO_SLOT); None when there are none. Memoised per batch."""
        cache = self._views
        if min_tokens not in cache:
            b = self.seg_bounds
            keep = [i for i, s in enumerate(self.seg_slots) if s != NO_SLOT and b[i + 1] - b[i] < min_tokens]
            if not keep:
                cache[min_tokens] = None
            else:
                idx = torch.cat([torch.arange(b[i], b[i + 1]) for i in keep]).to(self.token_slots.device)
                cache[min_tokens] = LoraBatch(
                    token_slots=self.token_slots,
                    seg_bounds=self.seg_bounds,
                    seg_slots=self.seg_slots,
                    lora_tokens=idx,
                    lora_token_slots=self.token_slots.index_select(0, idx),
                    slots=tuple(self.seg_slots[i] for i in keep),
                    partial=True,
                )
        return cache[min_tokens]

    @classmethod
    def from_token_slots(cls, slots_per_token: Sequence[int], device: torch.device | str = "cpu") -> "LoraBatch":
        """Build from a python list ``[num_tokens]`` whose equal values are already contiguous."""
        bounds, seg_slots = [0], []
        for i, s in enumerate(slots_per_token):
            if i and s == slots_per_token[i - 1]:
                continue
            if i:
                bounds.append(i)
            seg_slots.append(int(s))
        bounds.append(len(slots_per_token))
        if not slots_per_token:
            bounds = [0]
        if len(set(seg_slots)) != len(seg_slots):
            raise ValueError("tokens of one slot must be contiguous in the packed batch")
        token_slots = torch.tensor(list(slots_per_token), dtype=torch.int64, device=device)
        lora_idx = [i for i, s in enumerate(slots_per_token) if s != NO_SLOT]
        lora_tokens = torch.tensor(lora_idx, dtype=torch.int64, device=device)
        return cls(
            token_slots=token_slots,
            seg_bounds=bounds,
            seg_slots=seg_slots,
            lora_tokens=lora_tokens,
            lora_token_slots=token_slots[lora_tokens] if lora_idx else lora_tokens,
            slots=tuple(s for s in seg_slots if s != NO_SLOT),
        )


_state = threading.local()


def current_batch() -> LoraBatch | None:
    """The batch of the forward running on this thread, or None (plain base model)."""
    return getattr(_state, "batch", None)


@contextmanager
def use_batch(batch: LoraBatch | None) -> Iterator[None]:
    """Make ``batch`` visible to LoRA linears for the duration of one forward on this thread."""
    previous = getattr(_state, "batch", None)
    _state.batch = batch
    try:
        yield
    finally:
        _state.batch = previous
