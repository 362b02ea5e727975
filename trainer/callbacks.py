"""Trainer callbacks: a tqdm progress bar with loss and tokens/s, and Ctrl-C -> checkpoint + clean stop."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any, Iterator

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)


class InterruptCallback(TrainerCallback):
    """The first SIGINT/SIGTERM asks the run to stop after the current optimizer step:
    the Trainer then saves a checkpoint (``control.should_save``) and returns normally.
    A second signal gets the previous handler (usually KeyboardInterrupt). Ranks agree on
    stopping with one all-reduce per step, so no rank waits on a collective forever."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield
        finally:
            for number, handler in self._previous.items():
                signal.signal(number, handler)
            self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        log.warning("interrupt received: saving a checkpoint after this step (again to abort now)")

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


class ProgressCallback(TrainerCallback):
    """One tqdm bar on the main process: step, loss, eval loss, tokens/s (all ranks)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.trainer: Any = None  # set after the Trainer exists; it counts tokens
        self._bar: Any = None
        self._start = 0.0
        self._start_tokens = 0
        self._last_tps = 0.0
        self._postfix: dict[str, str] = {}

    def tokens_per_s(self) -> float:
        return self._last_tps

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._start_tokens = self.trainer.tokens_seen if self.trainer else 0
        if self.enabled and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                             dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        if self.trainer is not None:
            self._last_tps = (self.trainer.tokens_seen - self._start_tokens) * args.world_size / elapsed
            self._postfix["tok/s"] = f"{self._last_tps:,.0f}"
        if self._bar is not None:
            self._bar.update(state.global_step - self._bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self._postfix["loss"] = f"{logs['loss']:.4f}"
        if "eval_loss" in logs:
            self._postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
        if self._bar is not None:
            self._bar.set_postfix(self._postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.set_postfix(self._postfix)
            self._bar.close()
            self._bar = None
