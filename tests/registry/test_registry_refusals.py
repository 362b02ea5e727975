"""Every publish refusal: a clear one-line message and nothing written (both backends)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from registry_testkit import BASE_CONFIG, FINGERPRINT, lora_tensors, make_adapter, write_bf16_safetensors

from adapterctl.errors import FailedPrecondition, InvalidArgument, NotFound

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _tensors(**changes) -> dict:
    tensors = lora_tensors()
    for name, value in changes.items():
        if value is None:
            tensors.pop(name.replace("__", "."))
        else:
            tensors[name.replace("__", ".")] = value
    return tensors


def _poison(value: float) -> dict:
    t = lora_tensors()
    t[f"{Q0}.lora_B.weight"][3, 1] = value
    return t


# id -> (how to break a valid adapter dir, error type, message fragment)
CASES = {
    "missing-config": (lambda d: (d / "adapter_config.json").unlink(), InvalidArgument, "has no adapter_config.json"),
    "missing-weights": (
        lambda d: (d / "adapter_model.safetensors").unlink(),
        InvalidArgument,
        "has no adapter_model.safetensors",
    ),
    "extra-file": (lambda d: (d / "notes.txt").write_text("hi"), InvalidArgument, "unexpected file 'notes.txt'"),
    "extra-dir": (lambda d: (d / "checkpoint-10").mkdir(), InvalidArgument, "unexpected directory 'checkpoint-10'"),
    "pickle-bin": (
        lambda d: (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle"),
        InvalidArgument,
        "pickle weights are refused",
    ),
    "pickle-pt": (
        lambda d: (d / "optimizer.pt").write_bytes(b"\x80\x04"),
        InvalidArgument,
        "optimizer.pt: pickle weights",
    ),
    "dora": (lambda d: _edit_json(d / "adapter_config.json", use_dora=True), FailedPrecondition, "DoRA"),
    "modules-to-save": (
        lambda d: _edit_json(d / "adapter_config.json", modules_to_save=["lm_head"]),
        FailedPrecondition,
        "modules_to_save ['lm_head']",
    ),
    "not-lora": (
        lambda d: _edit_json(d / "adapter_config.json", peft_type="IA3"),
        FailedPrecondition,
        "peft_type 'IA3'",
    ),
    "bad-rank": (lambda d: _edit_json(d / "adapter_config.json", r=0), InvalidArgument, "r must be a positive integer"),
    "config-not-json": (
        lambda d: (d / "adapter_config.json").write_text("{"),
        InvalidArgument,
        "adapter_config.json is not readable JSON",
    ),
    "not-safetensors": (
        lambda d: (d / "adapter_model.safetensors").write_bytes(b"garbage!" * 4),
        InvalidArgument,
        "not a valid safetensors file",
    ),
    "empty-tensor": (
        {f"{Q0}__lora_A__weight": np.zeros((0, 64), np.float32)},
        InvalidArgument,
        "is empty (shape [0, 64])",
    ),
    "nan": (_poison(np.nan), InvalidArgument, "contains NaN or Inf"),
    "inf": (_poison(np.inf), InvalidArgument, "contains NaN or Inf"),
    "not-lora-name": (
        {f"{Q0}__weight": np.ones((64, 64), np.float32)},
        InvalidArgument,
        "is not a LoRA weight of a base module",
    ),
    "unpaired": ({f"{Q0}__lora_B__weight": None}, InvalidArgument, "has no lora_B tensor"),
    "wrong-shape": (
        {f"{Q0}__lora_B__weight": np.ones((32, 4), np.float32)},
        InvalidArgument,
        "has shape [32, 4], expected [64, 4]",
    ),
    "wrong-rank": (
        {f"{Q0}__lora_A__weight": np.ones((8, 64), np.float32)},
        InvalidArgument,
        "expected [4, 64] for rank 4",
    ),
    "layer-out-of-range": (
        {
            "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": np.ones((4, 64), np.float32),
            "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight": np.ones((64, 4), np.float32),
        },
        InvalidArgument,
        "layer 5 but the base model has 2 layers",
    ),
    "untargeted-module": (
        {
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": np.ones((4, 64), np.float32),
            "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": np.ones((128, 4), np.float32),
        },
        InvalidArgument,
        "which target_modules does not name",
    ),
    "unsupported-module": (
        {"base_model.model.lm_head.lora_A.weight": np.ones((4, 64), np.float32)},
        FailedPrecondition,
        "adapts 'lm_head'",
    ),
    "dora-magnitude": (
        {f"{Q0}__lora_magnitude_vector": np.ones((64,), np.float32)},
        FailedPrecondition,
        "DoRA magnitude vector",
    ),
    "int-dtype": ({f"{Q0}__lora_A__weight": np.ones((4, 64), np.int32)}, InvalidArgument, "has dtype I32"),
    "no-fingerprint": (
        lambda d: (d / "adapterctl.json").unlink(),
        FailedPrecondition,
        "names base model 'fake-base', which does not resolve on this machine",
    ),
    "bad-fingerprint": (
        lambda d: _edit_json(d / "adapterctl.json", base_model={"id": "x", "fingerprint": "md5:1"}),
        InvalidArgument,
        "is not sha256:<64 hex>",
    ),
    "no-base-config": (
        lambda d: _edit_json(d / "adapterctl.json", base_model={"id": "x", "fingerprint": FINGERPRINT}),
        FailedPrecondition,
        "no base_model.config",
    ),
    "meta-rank-mismatch": (
        lambda d: _edit_json(d / "adapterctl.json", lora={"rank": 16}),
        InvalidArgument,
        "adapterctl.json says rank 16 but adapter_config.json has r=4",
    ),
    "bf16-nan": (
        lambda d: write_bf16_safetensors(d / "adapter_model.safetensors", _poison(np.nan)),
        InvalidArgument,
        "NaN or Inf",
    ),
    # found by the reliability fuzzer (bench/reliability): each raised a non-domain exception before
    "config-nested-deep": (lambda d: (d / "adapter_config.json").write_text("[" * 100_000), InvalidArgument,
                           "is malformed (RecursionError"),
    "target-modules-null": (lambda d: _edit_json(d / "adapter_config.json", target_modules=[None]), InvalidArgument,
                            "is malformed (TypeError"),
    "meta-base-list": (lambda d: _edit_json(d / "adapterctl.json", base_model=[1]), InvalidArgument,
                       "is malformed (AttributeError"),
    "header-too-large": (lambda d: (d / "adapter_model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}"),
                         InvalidArgument, "safetensors"),
    "symlinked-weights": (lambda d: _symlink_weights(d), InvalidArgument, "is not a regular file (a symlink)"),
}


def _symlink_weights(d: Path) -> None:
    """The real weights, moved beside the dir and linked back in: refused (could change after hashing)."""
    target = d.with_name(d.name + "-weights.safetensors")
    (d / "adapter_model.safetensors").rename(target)
    (d / "adapter_model.safetensors").symlink_to(target)


@pytest.mark.parametrize("case", list(CASES))
def test_publish_refusal(registry, tmp_path, case):
    breaker, error, fragment = CASES[case]
    adapter = make_adapter(tmp_path / case)
    if callable(breaker):
        breaker(adapter)
    else:
        make_adapter(adapter, tensors=_tensors(**breaker))
    with pytest.raises(error) as info:
        registry.publish(adapter, "reviews")
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    assert list(registry.store.list("")) == [], "a refused publish must write nothing"


def test_missing_directory_and_bad_labels(registry, tmp_path, adapter_dir):
    with pytest.raises(NotFound, match="does not exist"):
        registry.publish(tmp_path / "nope", "reviews")
    with pytest.raises(InvalidArgument, match="invalid label key"):
        registry.publish(adapter_dir, "reviews", labels={"bad key": "x"})
    with pytest.raises(InvalidArgument, match="one line"):
        registry.publish(adapter_dir, "reviews", labels={"k": "a\nb"})
    assert list(registry.store.list("")) == []


@pytest.fixture
def fake_base(tmp_path) -> Path:
    """A base-model directory for ``--base-model``: config.json and a tiny weight file."""
    from safetensors.numpy import save_file

    base = tmp_path / "fake-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(BASE_CONFIG))
    save_file({"w": np.ones((2, 2), np.float32)}, str(base / "model.safetensors"))
    return base


def test_base_model_option_supplies_fingerprint_and_shapes(registry, tmp_path, fake_base):
    from adapterctl.basemodel import fingerprint

    adapter = make_adapter(tmp_path / "plain", with_meta=False)
    m = registry.publish(adapter, "reviews", base_model=str(fake_base))
    assert m.base_model == {"id": str(fake_base), "fingerprint": fingerprint(fake_base)}
    assert m.training is None


def test_base_model_option_must_match_the_declared_base(registry, adapter_dir, fake_base):
    with pytest.raises(FailedPrecondition, match="trained on base 'fake-base'"):
        registry.publish(adapter_dir, "reviews", base_model=str(fake_base))
    assert list(registry.store.list("")) == []


def test_shapes_are_checked_against_the_base_model_option(registry, tmp_path, fake_base):
    small = {**BASE_CONFIG, "hidden_size": 32}
    (fake_base / "config.json").write_text(json.dumps(small))
    adapter = make_adapter(tmp_path / "plain", with_meta=False)
    with pytest.raises(InvalidArgument, match="hidden_size=32"):
        registry.publish(adapter, "reviews", base_model=str(fake_base))


def test_rank_pattern_and_regex_targets_are_understood(registry, tmp_path):
    tensors = lora_tensors(rank=4, targets=("q_proj", "v_proj"))
    for layer in range(2):
        name = f"base_model.model.model.layers.{layer}.self_attn.v_proj"
        rng = np.random.default_rng(layer)
        tensors[f"{name}.lora_A.weight"] = rng.standard_normal((2, 64)).astype(np.float32)
        tensors[f"{name}.lora_B.weight"] = rng.standard_normal((32, 2)).astype(np.float32)
    adapter = make_adapter(tmp_path / "pattern", tensors=tensors,
                           peft={"rank_pattern": {"v_proj": 2}, "target_modules": r".*\.(q_proj|v_proj)"})
    m = registry.publish(adapter, "reviews")
    assert m.lora["rank_pattern"] == {"v_proj": 2} and m.lora["target_modules"] == ["q_proj", "v_proj"]


def test_manifest_listing_a_file_twice_is_refused_on_read(tmp_path, adapter_dir):
    """Found by the reliability fuzzer (tampered manifests): a duplicated file entry was pulled."""
    import json as _json

    from adapterctl.errors import IntegrityError
    from adapterctl.registry import open_registry

    reg = open_registry(str(tmp_path / "reg"))
    m = reg.publish(adapter_dir, "twice")
    path = tmp_path / "reg" / "adapters" / "twice" / "versions" / f"{m.version:09d}.json"
    data = _json.loads(path.read_text())
    data["files"].append(dict(data["files"][0]))
    path.write_text(_json.dumps(data))
    with pytest.raises(IntegrityError, match="lists a file twice"):
        reg.pull(f"twice:{m.version}", tmp_path / "out")
    assert not (tmp_path / "out").exists()
