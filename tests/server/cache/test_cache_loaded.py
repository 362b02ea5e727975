"""load_peft_dir: PEFT key mapping, scales (plain, rsLoRA, rank/alpha patterns) checked
against PEFT's own layers, and every refusal naming its feature."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterctl.errors import FailedPrecondition
from adapterctl.server.cache.loaded import base_linear_shapes, check_lora_config, load_peft_dir
from adapterctl.server.types import ServedAdapter


def _peft_deltas(tiny_model, adapter_dir, modules):
    """PEFT's own per-module delta ``lora_layer(x) - base_layer(x)`` for a fixed x."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(adapter_dir)).eval()
    out = {}
    with torch.no_grad():
        for path in modules:
            layer = model.get_submodule("base_model.model." + path)
            x = torch.randn(3, layer.base_layer.in_features, generator=torch.Generator().manual_seed(1))
            out[path] = (x, layer(x) - layer.base_layer(x))
    return out


def _assert_matches_peft(loaded, tiny_model, adapter_dir):
    for path, (x, want) in _peft_deltas(tiny_model, adapter_dir, loaded.weights).items():
        a, b = loaded.weights[path]
        got = loaded.scale * (x @ a.T) @ b.T
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_maps_peft_keys_to_base_module_paths(make_adapter, tiny_base, tiny_model):
    path = make_adapter("plain", r=4, lora_alpha=8)
    served = ServedAdapter("plain", 3, "sha256:" + "a" * 64)
    loaded = load_peft_dir(path, tiny_base, max_lora_rank=64, served=served)
    assert loaded.served == served and loaded.label == "plain:3"
    assert sorted(loaded.weights) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    a, b = loaded.weights["model.layers.0.self_attn.v_proj"]
    assert a.shape == (4, 64) and b.shape == (32, 4) and a.dtype == b.dtype == torch.float32
    assert a.is_contiguous() and a.device.type == "cpu"
    assert (loaded.rank, loaded.alpha, loaded.scale, loaded.use_rslora) == (4, 8.0, 2.0, False)
    assert loaded.target_modules == ("q_proj", "v_proj")
    assert loaded.nbytes == sum(4 * (a.numel() + b.numel()) for a, b in loaded.weights.values())
    _assert_matches_peft(loaded, tiny_model, path)


def test_default_identity_is_a_content_digest(make_adapter, tiny_base):
    path = make_adapter("plain", r=4, lora_alpha=8)
    one = load_peft_dir(path, tiny_base, 64)
    two = load_peft_dir(path, tiny_base, 64)
    assert one.served == two.served and one.served.name == "plain" and one.served.digest.startswith("sha256:")


def test_rslora_scale(make_adapter, tiny_base, tiny_model):
    path = make_adapter("rslora", r=16, lora_alpha=8, use_rslora=True, target_modules="all-linear")
    loaded = load_peft_dir(path, tiny_base, 64)
    assert loaded.scale == pytest.approx(8 / 4.0) and loaded.use_rslora
    assert set(loaded.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    _assert_matches_peft(loaded, tiny_model, path)


def test_rank_and_alpha_patterns_are_normalised_exactly(make_adapter, tiny_base, tiny_model):
    path = make_adapter(
        "patterns", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 8}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
    )
    loaded = load_peft_dir(path, tiny_base, 64)
    assert loaded.rank == 8 and loaded.scale == 1.0  # alpha 8 / padded rank 8
    assert all(a.shape[0] == 8 and b.shape[1] == 8 for a, b in loaded.weights.values())
    _assert_matches_peft(loaded, tiny_model, path)
    with pytest.raises(FailedPrecondition, match="rank 8 exceeds"):
        load_peft_dir(path, tiny_base, 4)


def test_bf16_weights_become_fp32(make_adapter, tiny_base, tmp_path):
    src = make_adapter("plain", r=4, lora_alpha=8)
    dst = tmp_path / "bf16"
    shutil.copytree(src, dst)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(dst / "adapter_model.safetensors").items()}
    save_file(tensors, dst / "adapter_model.safetensors")
    loaded = load_peft_dir(dst, tiny_base, 64)
    assert all(a.dtype == torch.float32 and b.dtype == torch.float32 for a, b in loaded.weights.values())


@pytest.mark.parametrize(
    "name, kwargs, feature",
    [
        ("dora", {"use_dora": True}, "DoRA"),
        ("mts", {"modules_to_save": ["q_norm"]}, "modules_to_save"),
        ("bias", {"bias": "lora_only"}, "bias"),
    ],
)
def test_refuses_unsupported_peft_features(make_adapter, tiny_base, name, kwargs, feature):
    path = make_adapter(name, **kwargs)
    with pytest.raises(FailedPrecondition, match=feature):
        load_peft_dir(path, tiny_base, 64)


def test_refuses_rank_over_limit(make_adapter, tiny_base):
    with pytest.raises(FailedPrecondition, match="rank 16 exceeds the server's max_lora_rank 8"):
        load_peft_dir(make_adapter("r16", r=16, lora_alpha=16), tiny_base, 8)


def test_refuses_other_base_fingerprint(make_adapter, tiny_base, tmp_path):
    src = make_adapter("plain", r=4, lora_alpha=8)
    other = "sha256:" + "0" * 64
    with pytest.raises(FailedPrecondition, match="trained on base model"):
        load_peft_dir(src, tiny_base, 64, expected_fingerprint=other)
    dst = tmp_path / "other-base"
    shutil.copytree(src, dst)
    (dst / "adapterctl.json").write_text(json.dumps({"base_model": {"id": "x", "fingerprint": other}}))
    with pytest.raises(FailedPrecondition, match="trained on base model"):
        load_peft_dir(dst, tiny_base, 64)
    (dst / "adapterctl.json").unlink()  # no fingerprint anywhere: shape checks still apply
    assert load_peft_dir(dst, tiny_base, 64).rank == 4


def _rewrite(src, dst, *, config=None, tensors=None):
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors(load_file(dst / "adapter_model.safetensors")), dst / "adapter_model.safetensors")
    return dst


def test_refuses_targets_missing_from_base(make_adapter, tiny_base, tmp_path):
    src = make_adapter("plain", r=4, lora_alpha=8)
    bad_cfg = _rewrite(src, tmp_path / "cfg", config={"target_modules": ["q_proj", "c_attn"]})
    with pytest.raises(FailedPrecondition, match=r"target modules \['c_attn'\] do not exist"):
        load_peft_dir(bad_cfg, tiny_base, 64)
    renamed = _rewrite(
        src, tmp_path / "keys", tensors=lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}
    )
    with pytest.raises(FailedPrecondition, match="model.layers.7.self_attn.q_proj does not exist"):
        load_peft_dir(renamed, tiny_base, 64)


def test_refuses_shape_mismatch_and_stray_tensors(make_adapter, tiny_base, tmp_path):
    src = make_adapter("plain", r=4, lora_alpha=8)
    wide = _rewrite(
        src,
        tmp_path / "wide",
        tensors=lambda t: {k: torch.zeros(4, 128) if k.endswith("q_proj.lora_A.weight") else v for k, v in t.items()},
    )
    with pytest.raises(FailedPrecondition, match=r"base .* needs A \(4, 64\)"):
        load_peft_dir(wide, tiny_base, 64)
    dora = _rewrite(
        src,
        tmp_path / "stray",
        tensors=lambda t: {
            **t,
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64),
        },
    )
    with pytest.raises(FailedPrecondition, match="DoRA"):
        load_peft_dir(dora, tiny_base, 64)
    half = _rewrite(
        src,
        tmp_path / "half",
        tensors=lambda t: {k: v for k, v in t.items() if "layers.0.self_attn.q_proj.lora_B" not in k},
    )
    with pytest.raises(FailedPrecondition, match="not both A and B"):
        load_peft_dir(half, tiny_base, 64)


def test_refuses_pickle_only_and_non_adapter_dirs(make_adapter, tiny_base, tmp_path):
    src = make_adapter("plain", r=4, lora_alpha=8)
    pickled = _rewrite(src, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(FailedPrecondition, match="pickle"):
        load_peft_dir(pickled, tiny_base, 64)
    with pytest.raises(FailedPrecondition, match="adapter_config.json missing"):
        load_peft_dir(tmp_path, tiny_base, 64)


def test_manifest_lora_dicts_are_checked_too():
    check_lora_config({"rank": 8, "use_dora": False, "modules_to_save": None}, 8)
    with pytest.raises(FailedPrecondition, match="DoRA"):
        check_lora_config({"rank": 8, "use_dora": True}, 64, "manifest")
    with pytest.raises(FailedPrecondition, match="modules_to_save"):
        check_lora_config({"rank": 8, "modules_to_save": ["lm_head"]}, 64)
    with pytest.raises(FailedPrecondition, match="pissa"):
        check_lora_config({"r": 8, "init_lora_weights": "pissa_niter_4"}, 64)
    with pytest.raises(FailedPrecondition, match="PEFT type 'IA3'"):
        check_lora_config({"peft_type": "IA3"}, 64)


def test_base_shapes_from_headers(tiny_base):
    shapes = base_linear_shapes(tiny_base)
    assert shapes["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert shapes["model.layers.1.mlp.down_proj"] == (64, 128)
