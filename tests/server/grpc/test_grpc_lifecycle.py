"""Lifecycle: NOT_SERVING + UNAVAILABLE while loading; SIGTERM drain of a real
``adapterctl serve`` subprocess (in-flight finishes, new refused, exit 0); JSON logs."""
from __future__ import annotations

import asyncio
import json
import queue
import signal
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapterctl.client import Client
from adapterctl.errors import Unavailable

NOT_SERVING, SERVING = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING


def test_not_serving_while_loading(tmp_path, echo_engine_cls):
    from adapterctl.server.app import BackgroundServer
    from adapterctl.server.config import ServerConfig

    gate = asyncio.Event()
    bg = BackgroundServer(ServerConfig(port=0, metrics_port=-1, http_port=-1),
                          lambda config, observer: echo_engine_cls(gate))
    bg.start(wait=False)
    try:
        with Client(bg.address, timeout=10) as c:
            assert c.health() == "NOT_SERVING"
            assert c.health("adapterctl.v1.Inference") == "NOT_SERVING"
            with pytest.raises(Unavailable, match="loading"):
                c.generate("too early")
            bg._loop.call_soon_threadsafe(gate.set)
            bg.wait_serving(30)
            assert c.health() == "SERVING" and c.generate("now").text == "now"
    finally:
        bg.stop()


@pytest.fixture
def served_process(tmp_path, tiny_base, published):
    """``adapterctl serve`` in a subprocess (JSON logs); yields (proc, address, log path)."""
    uri, _ = published
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "adapterctl.client.cli.main",
                "serve",
                "--base-model",
                str(tiny_base.path),
                "--registry",
                uri,
                "--port",
                "0",
                "--metrics-port",
                "-1",
                "--http-port",
                "0",
                "--shutdown-grace",
                "60",
                "--alias-refresh",
                "0",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--log-json",
                "--ready-file",
                str(tmp_path / "ready.json"),
            ],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=180)
        assert line.startswith("adapterctl serving grpc="), line
        address = line.split("grpc=", 1)[1].split()[0]
        ready = json.loads((tmp_path / "ready.json").read_text())
        assert address.endswith(f":{ready['port']}") and ready["pid"] == proc.pid
        assert f"http={ready['http_port']}" in line.split() and ready["http_port"] > 0
        yield proc, address, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_sigterm_drains_then_exits_zero(served_process):
    proc, address, log_path = served_process
    with grpc.insecure_channel(address) as channel, Client(address, timeout=120) as client:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == SERVING
        stream = client.generate_stream(
            "Once upon a time", adapter="alpha", max_new_tokens=120, request_id="inflight-1"
        )
        chunks = iter(stream)
        next(chunks)  # in flight now
        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        watch.cancel()
        with pytest.raises(Unavailable):
            client.generate("refused", max_new_tokens=2)
        list(chunks)  # the in-flight request still completes
        assert stream.result.finish_reason in ("length", "eos") and stream.result.adapter.name == "alpha"
    assert proc.wait(timeout=90) == 0
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    done = [r for r in records if r.get("request_id") == "inflight-1"]
    assert done and done[0]["status"] == "OK" and done[0]["adapter"] == "alpha" and done[0]["version"] == 2
    assert done[0]["completion_tokens"] == stream.result.completion_tokens and done[0]["latency_ms"] > 0
