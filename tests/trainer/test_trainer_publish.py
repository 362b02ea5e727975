"""--publish: training ends with a new version in a (moto S3) registry carrying the lineage."""
from __future__ import annotations

import pytest


def test_publish_lands_a_version_with_lineage(tiny_config, tiny_base, s3_registry_uri):
    from adapterctl.registry import open_registry
    from adapterctl.trainer import train

    result = train(tiny_config(max_steps=2, eval_split=0.1, rank=4, target_modules="all-linear",
                               publish="reviews", registry=s3_registry_uri))
    assert result.published == "reviews:1"
    manifest = open_registry(s3_registry_uri).resolve("reviews:1")
    assert manifest.base_model["fingerprint"] == tiny_base.fingerprint
    linear = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert manifest.lora["rank"] == 4 and sorted(manifest.lora["target_modules"]) == linear  # all-linear, short names
    training = manifest.training
    assert training["dataset"]["train_records"] == 43 and training["dataset"]["eval_records"] == 5
    assert len(training["dataset"]["train_sha256"]) == 64
    assert training["metrics"]["train_loss"] == pytest.approx(result.train_loss)
    assert training["metrics"]["eval_loss"] == pytest.approx(result.eval_loss)
    assert training["metrics"]["eval_perplexity"] > 1
    assert training["config"]["publish"] == "reviews" and training["wall_time_s"] > 0
    assert {"torch", "transformers", "peft"} <= set(training["versions"])
    assert sorted(f.path for f in manifest.files) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapterctl.json",
    ]
