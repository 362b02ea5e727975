"""TrainConfig: validation, config files (YAML/TOML) and their precedence under CLI flags."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterctl.errors import InvalidArgument
from adapterctl.trainer.config import TrainConfig

DEMO_DATA = Path(__file__).resolve().parents[2] / "examples" / "movie_reviews.jsonl"


def test_validation_messages():
    ok = dict(data="d.jsonl", output="out")
    with pytest.raises(InvalidArgument, match="--data is required"):
        TrainConfig(output="out")
    for bad, match in [({"rank": 0}, "rank"), ({"dropout": 1.0}, "dropout"), ({"epochs": 1, "max_steps": 3}, "either"),
                       ({"eval_split": 0.9}, "eval split"), ({"target_modules": "all-linear,q_proj"}, "all-linear"),
                       ({"publish": "bad/name"}, "invalid adapter name"), ({"format": "csv"}, "format")]:
        with pytest.raises(InvalidArgument, match=match):
            TrainConfig(**ok, **bad)
    assert TrainConfig(**ok, target_modules="q_proj, o_proj").target_modules == ["q_proj", "o_proj"]
    assert TrainConfig(**ok).resolved_epochs == 3.0


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_config_file_then_flags_override(tmp_path, suffix):
    path = tmp_path / f"train{suffix}"
    if suffix == ".yaml":
        path.write_text(
            "data: a.jsonl\noutput: out\nrank: 8\nlr: 0.001\nmax-steps: 5\ntarget_modules: [q_proj, o_proj]\n"
        )
    else:
        path.write_text(
            'data = "a.jsonl"\noutput = "out"\nrank = 8\nlr = 0.001\nmax_steps = 5\n'
            'target_modules = ["q_proj", "o_proj"]\n'
        )
    cfg = TrainConfig.from_sources(path, {"rank": 4, "alpha": None, "epochs": 2.0})
    assert (cfg.rank, cfg.lr, cfg.alpha, cfg.target_modules) == (4, 0.001, 32.0, ["q_proj", "o_proj"])
    assert cfg.epochs == 2.0 and cfg.max_steps is None  # a flag for one of a pair clears the file's other one
    path.write_text(path.read_text() + ("bogus: 1\n" if suffix == ".yaml" else "bogus = 1\n"))
    with pytest.raises(InvalidArgument, match="unknown option.*bogus"):
        TrainConfig.from_sources(path)


def test_cli_config_file_precedence_lands_in_manifest(tiny_base, tmp_path):
    from click.testing import CliRunner

    from adapterctl.client.cli.main import cli

    out = tmp_path / "adapter"
    path = tmp_path / "train.yaml"
    path.write_text(f"data: {DEMO_DATA}\noutput: {out}\nbase_model: {tiny_base.path}\nrank: 8\nalpha: 16\n"
                    "max_steps: 3\nprogress: false\nseed: 11\nuse_rslora: true\n")
    result = CliRunner().invoke(cli, ["train", "--config", str(path), "--rank", "4", "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "adapterctl.json").read_text())
    resolved = manifest["training"]["config"]
    assert (resolved["rank"], resolved["alpha"], resolved["max_steps"], resolved["seed"]) == (4, 16.0, 1, 11)
    assert manifest["lora"]["rank"] == 4 and manifest["lora"]["use_rslora"] is True
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is True


def test_readme_section_documents_every_option():
    import dataclasses

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"--{f.name.replace('_', '-')}" not in text]
    assert not missing, f"options missing from README.md: {missing}"
