"""bench/device_check.py, the CUDA check prepared for a lent GPU machine, rehearsed here on the
CPU: the packed base round-trips, the links map the checkout onto ``adapterctl.*`` as an install
would, and ``run`` goes through all its steps on a machine without the converted Gemma."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import device_check, random_base

pytestmark = pytest.mark.slow  # packs the real Gemma 3 270M's tokenizer


@pytest.fixture(scope="module")
def packed(gemma_base, tmp_path_factory) -> Path:
    return device_check.pack(tmp_path_factory.mktemp("devcache"))


def test_the_pack_round_trips_and_keeps_the_base_shape(packed, gemma_base, tmp_path):
    assert (packed / "tokenizer.json.gz").stat().st_size < (gemma_base.path / "tokenizer.json").stat().st_size / 3
    out = device_check.unpack(packed, tmp_path / "base")
    for name in (*device_check.BASE_FILES, "tokenizer.json"):
        assert (out / name).read_bytes() == (gemma_base.path / name).read_bytes(), name
    config, real = random_base.like(out), json.loads((gemma_base.path / "config.json").read_text())
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size, config.layer_types) == (
        real["hidden_size"], real["num_hidden_layers"], real["vocab_size"], real["layer_types"])


def test_the_links_import_the_checkout_as_adapterctl(tmp_path):
    site = device_check.namespace(tmp_path / "site")
    code = ("import adapterctl, adapterctl.server.engine.engine as e, adapterctl.v1.adapterctl_pb2 as pb, "
            "adapterctl.registry, adapterctl.trainer, adapterctl.client; "
            "print(adapterctl.__file__, e.__file__, pb.__file__, adapterctl.client.__file__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(site)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    files = done.stdout.split()
    assert all(f.startswith(str(site)) for f in files), files  # the links, not an installed copy
    assert Path(files[1]).resolve() == device_check.REPO / "server" / "engine" / "engine.py"


def test_run_rehearses_every_step_on_the_cpu(packed, tmp_path, capfd):
    """``run --device cpu`` with one test file and the roofline workload (quick): the models are
    built from the pack alone, the tests pass with ADAPTERCTL_TEST_DEVICE set, bench.run ends with
    its JSON line, and each step's log lands in OUT."""
    rc = device_check.run(packed, tmp_path / "out", "cpu", tmp_path / "work", parity_timeout=600,
                          bench_timeout=600, bench="roof", quick=True, parity=("test_paged_slots.py",))
    log = capfd.readouterr().out
    assert rc == 0, log[-4000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "bench.log", "environment.log", "models.log", "parity.log"]
    assert " passed" in (tmp_path / "out" / "parity.log").read_text()
    last = json.loads((tmp_path / "out" / "bench.log").read_text().strip().splitlines()[-1])
    assert last["roofline_bf16_b1"] > 0
    assert json.loads((tmp_path / "work" / "gemma-random" / "config.json").read_text())["num_hidden_layers"] == 18
