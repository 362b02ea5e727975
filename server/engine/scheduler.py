"""Iteration-level scheduling: a bounded wait queue, admission under row / KV / device-slot
limits with a fairness bound, and the chunk list of each forward step.

Fairness: admission walks the queue oldest first. A request that cannot be admitted
may be overtaken by at most ``max_bypass`` later admissions. Then, if it waits for
rows or KV, nothing behind it is admitted until running sequences (each bounded by
max_new_tokens) free enough; if it waits for device pages (:mod:`~.slots`), the resident
adapters of the run of pages that frees soonest are *drained*: they get no new rows, their
pages free within max_new_tokens steps and go to the waiting request, while every other
admission of a resident adapter continues so the batch stays full (no other adapter loads
meanwhile, so the freed pages are not taken). Waiting time is therefore bounded for
every adapter, unlike "skip what does not fit", which can starve a cold adapter.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from adapterctl.errors import ResourceExhausted
from adapterctl.server.engine.config import EngineConfig
from adapterctl.server.engine.kv import KVCache
from adapterctl.server.engine.prefill import PrefillPolicy
from adapterctl.server.engine.prefix import PrefixCache
from adapterctl.server.engine.runner import Chunk
from adapterctl.server.engine.slots import DeviceSlots
from adapterctl.server.textstream import StopTextStream
from adapterctl.server.types import GenerationRequest, HostAdapter, SamplingParams, ServedAdapter

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Sequence:
    """One request's scheduling and decoding state (owned by the decode thread once submitted)."""

    request: GenerationRequest
    params: SamplingParams
    served: ServedAdapter | None
    adapter: HostAdapter | None  # host weights, needed until the adapter is in a slot
    sink: Callable[[object], None]  # delivers TokenEvent / GenerationResult / exception to the consumer
    text: StopTextStream
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    row: int = -1  # KV row while running
    slot: int = 0  # device slot while running (0 = base)
    computed: int = 0  # tokens whose K/V are cached
    output: list[int] = field(default_factory=list)
    bypassed: int = 0
    cancelled: bool = False  # set from any thread; acted on at the next step
    finish_reason: str | None = None
    first_token_at: float | None = None
    constraint: Any = None  # grammar.Constraint for a response_format request
    logprobs: list = field(default_factory=list)  # [TokenLogprob] per output token, when asked

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt) + self.params.max_new_tokens

    @property
    def in_prefill(self) -> bool:
        return self.computed < len(self.prompt)

    def next_chunk(self, budget: int) -> Chunk:
        """The next tokens to feed (prompt chunk of at most ``budget``, or the last output)."""
        if self.in_prefill:
            end = min(len(self.prompt), self.computed + budget)
            last = end == len(self.prompt)
            return Chunk(self.row, self.computed, self.prompt[self.computed: end], self.slot, last, self.argmax_only)
        return Chunk(self.row, self.computed, [self.output[-1]], self.slot, True, self.argmax_only)

    @property
    def argmax_only(self) -> bool:
        """Only the argmax of this sequence's logits is read: greedy, no logprobs, no grammar."""
        return self.params.temperature == 0 and not self.params.logprobs and self.constraint is None


class Scheduler:
    """Waiting queue + running set. ``submit`` is thread-safe (a request is cancelled by
    setting ``Sequence.cancelled`` from any thread); everything else runs on the decode
    thread."""

    def __init__(self, config: EngineConfig, kv: KVCache, slots: DeviceSlots, policy: PrefillPolicy,
                 prefix: PrefixCache | None = None) -> None:
        self.config = config
        self.kv = kv
        self.prefix = prefix  # restores a cached prompt prefix into a new row at admission
        self.slots = slots
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._lock = threading.Lock()
        self._reserved = 0  # sum of reserved_tokens over running
        self._rejected: list[tuple[Sequence, Exception]] = []
        self.submitted = 0  # requests ever queued
        self._seen = 0  # ``submitted`` when admission last looked at the queue
        self.draining: frozenset[ServedAdapter] = frozenset()  # adapters whose pages are freed for a waiter

    # ---- any thread ----------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; ResourceExhausted when the wait queue is full."""
        with self._lock:
            if len(self.waiting) >= self.config.max_waiting:
                raise ResourceExhausted(f"the wait queue is full ({self.config.max_waiting} requests); retry later")
            self.waiting.append(seq)
            self.submitted += 1

    @property
    def has_arrivals(self) -> bool:
        """Requests were queued since admission last looked (a cheap "anything new?")."""
        return self.submitted != self._seen

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self.waiting)

    # ---- decode thread -------------------------------------------------------------
    def drop_cancelled(self) -> list[Sequence]:
        """Remove cancelled sequences (waiting or running), freeing their rows and slots."""
        with self._lock:
            gone = [s for s in self.waiting if s.cancelled]
            for s in gone:
                self.waiting.remove(s)
        for s in [s for s in self.running if s.cancelled]:
            self.release(s)
            gone.append(s)
        return gone

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into the running set, oldest first, within the limits
        and the bypass bound (see module docstring). Returns the admitted ones."""
        admitted: list[Sequence] = []
        blocked: list[tuple[Sequence, str]] = []  # (sequence, what it waits for)
        draining: frozenset[ServedAdapter] = frozenset()
        with self._lock:
            queue = list(self.waiting)
            self._seen = self.submitted
        for seq in queue:
            if seq.cancelled:
                continue
            if blocked and blocked[0][0].bypassed >= self.config.max_bypass:
                if blocked[0][1] != "slot":
                    break  # rows/KV: let the running set shrink until the oldest fits
                draining = draining or self._pick_drain(blocked[0][0])
                if not draining:
                    break
                if seq.served in draining:
                    continue  # no new rows for the adapters whose pages are being freed
                if seq.served is not None and seq.served not in self.slots.lru:
                    continue  # nor new loads: pages freed for the starving request are its own
            reason = self._try_admit(seq)
            if not reason:
                admitted.append(seq)
                for b, _ in blocked:
                    b.bypassed += 1
            elif reason == "slot" and seq.adapter is not None and self.slots.blocked_by_pins(seq.adapter):
                self._rejected.append((seq, ResourceExhausted(
                    f"pinned adapters hold the device pages; adapter {seq.served.name}:{seq.served.version} "
                    f"cannot be loaded until one is unpinned")))
            else:
                blocked.append((seq, reason))
        self.draining = draining
        gone = admitted + [s for s, _ in self._rejected]
        if gone:
            with self._lock:
                for seq in gone:
                    if seq in self.waiting:
                        self.waiting.remove(seq)
        return admitted

    def _pick_drain(self, starving: Sequence) -> frozenset[ServedAdapter]:
        """The adapters to drain for ``starving``'s adapter: the occupants of the run of device
        pages (none pinned) whose running rows finish soonest (empty if there is none)."""
        if starving.adapter is None:
            return frozenset()
        remaining: dict[ServedAdapter, int] = {}
        for s in self.running:
            if s.served is not None:
                left = len(s.prompt) - min(s.computed, len(s.prompt)) + s.params.max_new_tokens - len(s.output)
                remaining[s.served] = max(remaining.get(s.served, 0), left)
        runs = self.slots.unpinned_runs(starving.adapter)
        return min(runs, key=lambda held: max((remaining.get(o, 0) for o in held), default=0), default=frozenset())

    def take_rejected(self) -> list[tuple[Sequence, Exception]]:
        """Sequences refused for good at admission, with the error to deliver."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def _try_admit(self, seq: Sequence) -> str:
        """Admit ``seq`` if it fits; else return what it waits for ("rows", "kv", "slot")."""
        cfg = self.config
        if len(self.running) >= cfg.max_running_requests:
            return "rows"
        if self._reserved + seq.reserved_tokens > cfg.max_kv_tokens:
            return "kv"
        if seq.served is not None:
            resident = self.slots.lookup(seq.served)
            if resident is None:
                assert seq.adapter is not None  # host weights travel with a sequence until it has a slot
                resident = self.slots.ensure(seq.adapter) if self.slots.can_load(seq.adapter) else None
                if resident is None:
                    return "slot"
            self.slots.acquire(seq.served)
            seq.slot = resident.slot
            seq.adapter = None  # the slot holds the weights now
        seq.row = self.kv.alloc_row(seq.reserved_tokens)
        if self.prefix is not None:  # prefill starts after the cached prefix (at least one token is left)
            seq.computed = self.prefix.restore(seq.served, seq.prompt, self.kv, seq.row)
        self._reserved += seq.reserved_tokens
        self.running.append(seq)
        return ""

    def release(self, seq: Sequence) -> None:
        """Take a running sequence out: free its KV row (compacting) and its slot reference."""
        self.running.remove(seq)
        moved = self.kv.free_row(seq.row)
        if moved is not None:
            for other in self.running:
                if other.row == moved:
                    other.row = seq.row
                    break
        seq.row = -1
        self._reserved -= seq.reserved_tokens
        if seq.served is not None:
            self.slots.release(seq.served)

    def plan(self) -> list[tuple[Sequence, Chunk]]:
        """The chunks of the next step, ordered by slot so LoRA segments are contiguous:
        decode rows and/or prompt chunks (oldest first) as :attr:`policy` shapes the step,
        at most ``max_batch_tokens`` tokens."""
        decode = [s for s in self.running if not s.in_prefill]
        prefill = sorted((s for s in self.running if s.in_prefill), key=lambda s: s.arrival)
        shape = self.policy.shape(bool(decode), bool(prefill))
        budget = self.config.max_batch_tokens
        chosen: list[tuple[Sequence, Chunk]] = []
        if shape.decode:
            chosen = [(s, s.next_chunk(1)) for s in decode]
            budget -= len(chosen)
        if shape.prefill:
            for s in prefill:
                if budget <= 0:
                    break
                chunk = s.next_chunk(budget)
                chosen.append((s, chunk))
                budget -= len(chunk.tokens)
        chosen.sort(key=lambda sc: sc[1].slot)
        return chosen

    def kv_used(self) -> float:
        return self._reserved / self.config.max_kv_tokens
