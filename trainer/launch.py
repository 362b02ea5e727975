"""Data-parallel runs: ``train(config)`` with ``num_processes > 1`` re-launches itself under
``torch.distributed.run`` (gloo on CPU, nccl on GPUs) and collects rank 0's result.

Workers run ``python -m adapterctl.trainer --config <resolved.json>``; rank 0 writes the
adapter and a result file; this parent process publishes (so credentials and the registry
are touched once) and returns the same :class:`TrainResult` a single-process run would.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from adapterctl.errors import AdapterctlError, InvalidArgument
from adapterctl.trainer.config import TrainConfig

log = logging.getLogger(__name__)

RESULT_ENV = "ADAPTERCTL_TRAIN_RESULT"


def launch_distributed(config: TrainConfig) -> Any:
    from adapterctl.trainer.loop import TrainingInterrupted, TrainResult, publish

    check_launchable(config)
    Path(config.output).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="adapterctl-launch-") as tmp:
        config_path = Path(tmp) / "config.json"
        result_path = Path(tmp) / "result.json"
        config_path.write_text(json.dumps(config.replace(publish=None).to_dict()))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(config.num_processes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{_free_port()}",
            "-m",
            "adapterctl.trainer",
            "--config",
            str(config_path),
        ]
        env = {
            **os.environ,
            RESULT_ENV: str(result_path),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(_threads(config))),
        }
        log.info("launching %d processes: %s", config.num_processes, " ".join(cmd))
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the workers handle Ctrl-C and checkpoint
        try:
            proc = subprocess.run(cmd, env=env)
        finally:
            signal.signal(signal.SIGINT, previous)
        fields = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if "interrupted_at" in fields:
        raise TrainingInterrupted(fields["interrupted_at"], config.checkpoints)
    if proc.returncode != 0 or "output_dir" not in fields:
        raise AdapterctlError(f"distributed training failed (exit code {proc.returncode}); see the worker output above")
    result = TrainResult(**{**fields, "output_dir": Path(fields["output_dir"])})
    if config.publish:
        result.published = publish(result.output_dir, config.publish, config.registry)
    return result


def write_result(fields: dict[str, Any]) -> None:
    """Rank 0 of a launched run: hand the result (or ``interrupted_at``) to the parent;
    a no-op when this process was not launched by :func:`launch_distributed`."""
    target = os.environ.get(RESULT_ENV)
    if target:
        Path(target).write_text(json.dumps(fields, default=str))


def _threads(config: TrainConfig) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // config.num_processes)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_launchable(config: TrainConfig) -> None:
    if config.num_processes > 1 and config.device == "cuda":
        import torch

        if torch.cuda.device_count() < config.num_processes:
            raise InvalidArgument(f"--num-processes {config.num_processes}: only {torch.cuda.device_count()} GPU(s)")
