"""Helpers for the registry tests (importable by name: conftest puts this folder on
sys.path, which spawned worker processes inherit): small valid PEFT LoRA adapters
for a fake base, written with safetensors directly — no model loading."""
from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import numpy as np

FINGERPRINT = "sha256:" + "ab" * 32
# A tiny Gemma-3-like base: q/o 2 heads x 32, k/v 1 head x 32, MLP 128.
BASE_CONFIG = {
    "model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 1000,
}
IN_OUT = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
          "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}


def lora_tensors(rank: int = 4, targets=("q_proj", "v_proj"), layers: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """PEFT-named random lora_A [r, in] / lora_B [out, r] tensors for the fake base."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(layers):
        for target in targets:
            fan_in, fan_out = IN_OUT[target]
            part = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{target}"
            out[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, fan_in)).astype(np.float32)
            out[f"{prefix}.lora_B.weight"] = rng.standard_normal((fan_out, rank)).astype(np.float32)
    return out


def make_adapter(path: Path, *, rank: int = 4, targets=("q_proj", "v_proj"), seed: int = 0,
                 tensors: dict[str, np.ndarray] | None = None, peft: dict | None = None,
                 meta: dict | None = None, with_meta: bool = True) -> Path:
    """Write a PEFT LoRA directory (+ adapterctl.json) that the registry accepts."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
              "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "base_model_name_or_path": "fake-base", "task_type": "CAUSAL_LM", **(peft or {})}
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors if tensors is not None else lora_tensors(rank, targets, seed=seed),
              str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    if with_meta:
        doc = {"format": "adapterctl.adapter/v1",
               "base_model": {"id": "fake-base", "fingerprint": FINGERPRINT, "config": BASE_CONFIG},
               "lora": {"rank": rank, "alpha": 2 * rank, "dropout": 0.0, "target_modules": list(targets),
                        "use_rslora": False},
               "training": {"dataset": {"train_sha256": "cd" * 32, "train_records": 40},
                            "metrics": {"train_loss": 1.5}}}
        (path / "adapterctl.json").write_text(json.dumps({**doc, **(meta or {})}))
    return path


def write_bf16_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """numpy cannot hold bfloat16: truncate float32 to its upper 16 bits and write the file by hand."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        raw = (array.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


class PauseAfterAliasRead:
    """Store proxy: every reader of an alias waits for the others, so all of them
    hold the same etag when they write — a deterministic lost-update race."""

    def __init__(self, store, parties: int) -> None:
        self._store = store
        self._barrier = threading.Barrier(parties)

    def __getattr__(self, name):
        return getattr(self._store, name)

    def get(self, key):
        try:
            return self._store.get(key)
        finally:
            if "/aliases/" in key:
                self._barrier.wait(timeout=30)


# -- worker processes (multiprocessing "spawn" imports this module by name) ----------

def publish_worker(uri: str, adapter_dir: str, name: str, barrier, results) -> None:
    """Wait until every worker is ready, then publish at once; report the version."""
    from adapterctl.registry import open_registry

    registry = open_registry(uri)
    barrier.wait(timeout=120)
    try:
        results.put(("ok", registry.publish(Path(adapter_dir), name).version))
    except Exception as exc:  # reported to the parent, which fails the test with it
        results.put(("error", repr(exc)))


class HangHalfway:
    """A file object that yields the first half of ``size`` bytes, then says so on
    stdout and blocks (until the test kills the process)."""

    def __init__(self, fileobj, size: int) -> None:
        self._fileobj, self._left = fileobj, size // 2

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            import threading

            print("blocked-mid-upload", flush=True)
            threading.Event().wait(timeout=300)
            raise TimeoutError("the test should have killed this process")
        data = self._fileobj.read(self._left if n is None or n < 0 else min(n, self._left))
        self._left -= len(data)
        return data


def publish_then_hang(uri: str, adapter_dir: str, name: str) -> None:
    """Publish, uploading the first blob completely and hanging halfway through the second."""
    from adapterctl.registry import open_registry

    registry = open_registry(uri)
    real_put_file, calls = registry.store.put_file, []

    def put_file(key, fileobj, size, callback=None):
        calls.append(key)
        return real_put_file(key, fileobj if len(calls) < 2 else HangHalfway(fileobj, size), size, callback)

    registry.store.put_file = put_file
    registry.publish(Path(adapter_dir), name)
    raise AssertionError("publish should have hung")


if __name__ == "__main__":
    import sys

    publish_then_hang(*sys.argv[1:4])
