"""Issue 2 end to end on the real Gemma 3 270M: train -> publish to S3 (moto over
HTTP) -> serve on a free loopback port -> generate through the client, with and
without the adapter, compared with stock PEFT / HF greedy outputs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The new sci-fi blockbuster was"
NEW_TOKENS = 16

pytestmark = pytest.mark.slow


def _wait_for_ready(ready: Path, proc: subprocess.Popen, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited early ({proc.returncode})"
        if ready.is_file() and ready.stat().st_size:
            return json.loads(ready.read_text())
        time.sleep(0.1)  # polling a condition with a deadline, not a synchronisation sleep
    raise AssertionError("server did not become ready")


def _reference_greedy(base_path: Path, adapter_dir: Path | None) -> list[int]:
    """Stock transformers (+ PEFT when adapter_dir) greedy continuation of PROMPT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_path))
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_train_publish_serve_generate(gemma_base, s3_registry_uri, moto_server, tmp_path):
    from adapterctl.client import Client
    from adapterctl.errors import NotFound
    from adapterctl.registry import open_registry
    from adapterctl.trainer import TrainConfig, train

    adapter_dir = tmp_path / "adapter"
    result = train(TrainConfig(data=str(ROOT / "examples/movie_reviews.jsonl"), output=str(adapter_dir),
                               base_model="gemma-3-270m", max_steps=4, batch_size=4, lr=2e-3, seed=0,
                               progress=False))
    assert result.losses[-1] < result.losses[0]
    manifest = open_registry(s3_registry_uri).publish(adapter_dir, "reviews")
    assert manifest.version == 1

    ready = tmp_path / "ready.json"
    env = dict(os.environ, AWS_ENDPOINT_URL=moto_server)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "adapterctl.client.cli.main",
            "serve",
            "--registry",
            s3_registry_uri,
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--ready-file",
            str(ready),
            "--dtype",  # the reference below is fp32 PEFT: auto picks bf16 on AVX512-BF16/AMX hosts
            "float32",
        ],
        env=env,
        cwd=tmp_path,
    )
    try:
        info = _wait_for_ready(ready, proc)
        with Client(f"{info['host']}:{info['port']}") as client:
            tuned = client.generate(PROMPT, adapter="reviews", max_new_tokens=NEW_TOKENS)
            base = client.generate(PROMPT, max_new_tokens=NEW_TOKENS)
            with pytest.raises(NotFound):
                client.generate(PROMPT, adapter="no-such-adapter", max_new_tokens=4)
            again = client.generate(PROMPT, adapter="reviews:1", max_new_tokens=NEW_TOKENS)
        metrics = (
            urllib.request.urlopen(f"http://{info['host']}:{info['metrics_port']}/metrics", timeout=10).read().decode()
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0

    assert (tuned.adapter.name, tuned.adapter.version, tuned.adapter.digest) == ("reviews", 1, manifest.digest)
    assert base.adapter is None or not base.adapter.name
    assert again.token_ids == tuned.token_ids  # the server kept serving after NOT_FOUND
    assert list(tuned.token_ids) == _reference_greedy(gemma_base.path, adapter_dir)
    assert list(base.token_ids) == _reference_greedy(gemma_base.path, None)
    assert tuned.token_ids != base.token_ids, "the trained adapter should change the greedy output"
    ok_lines = [
        line for line in metrics.splitlines()
        if line.startswith("adapterctl_requests_total") and 'adapter="reviews"' in line
    ]
    assert any('code="OK"' in line and float(line.rsplit(" ", 1)[1]) >= 2 for line in ok_lines), ok_lines
