"""Runs: eval metrics in the manifest, Ctrl-C checkpoint + resume == uninterrupted, determinism."""
from __future__ import annotations

import json
import math
import os
import signal

import pytest
from transformers import TrainerCallback


class _SigintAt(TrainerCallback):
    """Sends this process a real SIGINT at the end of step ``step`` (what Ctrl-C does)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_eval_metrics_resume_and_determinism(tiny_config, tmp_path):
    from adapterctl.trainer import TrainingInterrupted, train

    common = dict(max_steps=6, dropout=0.1, eval_split=0.1, eval_steps=2, lr_scheduler="cosine", warmup_steps=1)
    first = train(tiny_config(output=str(tmp_path / "a"), **common))
    manifest = json.loads((first.output_dir / "adapterctl.json").read_text())
    metrics, dataset = manifest["training"]["metrics"], manifest["training"]["dataset"]
    assert metrics["eval_loss"] == pytest.approx(first.eval_loss) and math.isfinite(first.eval_loss)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(first.eval_loss))
    assert dataset["train_records"] == 43 and dataset["eval_records"] == 5
    assert dataset["eval_sha256"] == dataset["train_sha256"]  # split from the same file

    # Same seed + data: same adapter bytes.
    again = train(tiny_config(output=str(tmp_path / "b"), **common))
    assert again.losses == first.losses
    assert (again.output_dir / "adapter_model.safetensors").read_bytes() == \
        (first.output_dir / "adapter_model.safetensors").read_bytes()

    # Ctrl-C at step 4 saves a checkpoint and stops cleanly; --resume finishes identically.
    # Python's own SIGINT handler first: a shell's background job starts with SIGINT ignored.
    cfg = tiny_config(output=str(tmp_path / "c"), **common)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(TrainingInterrupted) as info:
            train(cfg, callbacks=[_SigintAt(4)])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    finally:
        signal.signal(signal.SIGINT, outer)
    assert info.value.step == 4 and (cfg.checkpoints / "checkpoint-4").is_dir()
    assert not (tmp_path / "c" / "adapter_model.safetensors").exists()
    resumed = train(cfg.replace(resume=True))
    assert resumed.losses == first.losses and len(resumed.losses) == 6
    assert resumed.eval_loss == first.eval_loss
    assert (resumed.output_dir / "adapter_model.safetensors").read_bytes() == \
        (first.output_dir / "adapter_model.safetensors").read_bytes()
    assert not cfg.checkpoints.exists()  # removed after success (keep with --keep-checkpoints)


def test_resume_needs_a_checkpoint_and_fresh_runs_refuse_old_ones(tiny_config, tmp_path):
    from adapterctl.errors import FailedPrecondition
    from adapterctl.trainer import train

    cfg = tiny_config(output=str(tmp_path / "r"), max_steps=2, resume=True)
    with pytest.raises(FailedPrecondition, match="no checkpoint"):
        train(cfg)
    (cfg.checkpoints / "checkpoint-1").mkdir(parents=True)
    with pytest.raises(FailedPrecondition, match="--resume"):
        train(cfg.replace(resume=False))


def test_resume_refuses_a_different_run(tiny_config):
    from adapterctl.errors import FailedPrecondition
    from adapterctl.trainer.checkpoints import check_checkpoints, run_record, write_run_record

    dataset = {"train_sha256": "a" * 64, "eval_sha256": None}
    cfg = tiny_config(max_steps=4, resume=True)
    (cfg.checkpoints / "checkpoint-2").mkdir(parents=True)
    write_run_record(cfg, run_record(cfg, dataset))
    assert check_checkpoints(cfg, run_record(cfg.replace(progress=True), dataset)).endswith("checkpoint-2")
    with pytest.raises(FailedPrecondition, match="different lr"):
        check_checkpoints(cfg, run_record(cfg.replace(lr=0.5), dataset))
    with pytest.raises(FailedPrecondition, match="train_sha256"):
        check_checkpoints(cfg, run_record(cfg, {**dataset, "train_sha256": "b" * 64}))
