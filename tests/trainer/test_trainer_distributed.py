"""Two-process data parallel (torch.distributed, gloo on CPU) matches one process with grad accumulation."""
from __future__ import annotations

import json

import pytest


def test_two_processes_match_single_process_loss_curve(tiny_config, tmp_path):
    from adapterctl.trainer import train

    common = dict(max_steps=3, batch_size=2, dropout=0.0, eval_split=0.1)
    single = train(tiny_config(output=str(tmp_path / "one"), grad_accum=2, **common))
    double = train(tiny_config(output=str(tmp_path / "two"), num_processes=2, **common))
    assert len(double.losses) == 3
    assert double.losses == pytest.approx(single.losses, rel=1e-4)
    assert double.eval_loss == pytest.approx(single.eval_loss, rel=1e-4)
    manifest = json.loads((double.output_dir / "adapterctl.json").read_text())
    assert manifest["training"]["config"]["num_processes"] == 2
    assert (double.output_dir / "adapter_model.safetensors").is_file()
