"""Checkpoint-directory bookkeeping: refuse to resume a different run, or to overwrite an old one.

``run.json`` in the checkpoint directory records what decides the training trajectory
(the options below plus the data digests); ``--resume`` compares against it.
"""
from __future__ import annotations

import json
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

from adapterctl.errors import FailedPrecondition
from adapterctl.trainer.config import TrainConfig

RUN_FILE = "run.json"
# Options that do not change what is computed (where, how visibly, and what happens after).
_NOT_TRAJECTORY = {"output", "resume", "keep_checkpoints", "checkpoint_dir", "progress", "publish", "registry",
                   "device", "save_steps", "data", "eval_data"}


def run_record(config: TrainConfig, dataset: dict[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in config.to_dict().items() if k not in _NOT_TRAJECTORY}
    return {"options": options, "train_sha256": dataset["train_sha256"], "eval_sha256": dataset["eval_sha256"]}


def check_checkpoints(config: TrainConfig, record: dict[str, Any]) -> str | None:
    """The checkpoint to resume from (None for a fresh run). FailedPrecondition when
    ``--resume`` finds nothing or a different run, or a fresh run would mix with old checkpoints."""
    directory = config.checkpoints
    last = get_last_checkpoint(str(directory)) if directory.is_dir() else None
    if not config.resume:
        if last is not None:
            raise FailedPrecondition(f"{directory} holds checkpoints of an earlier run; "
                                     "pass --resume to continue it or remove them")
        return None
    if last is None:
        raise FailedPrecondition(f"--resume: no checkpoint under {directory}")
    saved_path = directory / RUN_FILE
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        changed = sorted(k for k in set(saved["options"]) | set(record["options"])
                         if saved["options"].get(k) != record["options"].get(k))
        changed += [k for k in ("train_sha256", "eval_sha256") if saved.get(k) != record.get(k)]
        if changed:
            raise FailedPrecondition(f"--resume: the checkpoints in {directory} come from a run with different "
                                     f"{', '.join(changed)}; resume with the same options and data")
    return last


def write_run_record(config: TrainConfig, record: dict[str, Any]) -> None:
    config.checkpoints.mkdir(parents=True, exist_ok=True)
    (config.checkpoints / RUN_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
