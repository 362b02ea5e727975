"""The server's adapter loader (disk tier, ``load_peft_dir``) refuses malformed directories
with FailedPrecondition, never a parser exception (found by the reliability fuzzer)."""
from __future__ import annotations

import json
import shutil

import pytest

from adapterctl.errors import FailedPrecondition
from adapterctl.server.cache.loaded import load_peft_dir

BREAKERS = {
    "config-nested": lambda d: (d / "adapter_config.json").write_text("[" * 100_000),
    "config-not-json": lambda d: (d / "adapter_config.json").write_text("{"),
    "rank-a-list": lambda d: _edit(d / "adapter_config.json", r=[4]),
    "alpha-null": lambda d: _edit(d / "adapter_config.json", lora_alpha=None),
    "header-too-large": lambda d: (d / "adapter_model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}"),
    "weights-truncated": lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:100]),
}


def _edit(path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case", list(BREAKERS))
def test_malformed_adapter_dir_is_failed_precondition(make_adapter, tiny_base, tmp_path, case):
    d = tmp_path / case
    shutil.copytree(make_adapter("malformed-src", seed=5), d)
    BREAKERS[case](d)
    with pytest.raises(FailedPrecondition) as info:
        load_peft_dir(d, tiny_base, 64)
    assert str(d) in str(info.value) and "\n" not in str(info.value)
