"""Scale-out through the real deploy/nginx config: real ``adapterctl serve`` replicas
(subprocesses, tiny model, batching engine) on loopback behind nginx's consistent hash
on ``x-adapter``. Which replica served a request is read from each replica's /metrics.

- one adapter's requests always land on the same replica, over gRPC (``x-adapter``) and over
  the OpenAI HTTP API (the name part of the body's ``model``, or an ``X-Adapter`` header),
  and SSE streams pass through;
- removing a replica from the upstream list moves only that replica's adapters;
- a replica given SIGTERM stops getting new requests while it drains its in-flight one,
  and no request is lost (none fails; the in-flight one completes).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapterctl.client import Client
from adapterctl.errors import PermissionDenied

NAMES = [f"tenant-{i}" for i in range(24)]  # 3 replicas: P(all on one) is negligible
STARTUP_S = 300
LONG = 400  # tokens of the in-flight generation: outlasts the requests sent while it drains


class Replica:
    """``adapterctl serve`` in a subprocess on 127.0.0.1 port 0 (ports from --ready-file)."""

    def __init__(self, workdir: Path, registry: str, base: Path) -> None:
        workdir.mkdir(parents=True)
        self.ready = workdir / "ready.json"
        self.log = (workdir / "server.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adapterctl.client.cli.main", "serve", "--http-port", "0",
             "--base-model", str(base), "--registry", registry, "--port", "0", "--metrics-port", "0",
             "--shutdown-grace", "60", "--alias-refresh", "0", "--max-new-tokens-limit", "2000",
             "--max-prompt-tokens", "64", "--cache-dir", str(workdir / "cache"), "--ready-file", str(self.ready)],
            stdout=subprocess.DEVNULL, stderr=self.log)
        self.address = self.http_address = ""
        self.metrics_port = 0

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while not self.ready.exists():  # written (atomically) once SERVING
            assert self.proc.poll() is None, f"replica exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "replica not SERVING in time"
            time.sleep(0.2)
        info = json.loads(self.ready.read_text())
        self.address, self.metrics_port = f"127.0.0.1:{info['port']}", info["metrics_port"]
        self.http_address = f"127.0.0.1:{info['http_port']}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, make_adapter, tiny_base, nginx_installed):
    from adapterctl.registry import open_registry

    root = tmp_path_factory.mktemp("scale-out")
    uri = f"file://{root / 'registry'}"
    registry = open_registry(uri)
    adapter = make_adapter("scale-out", seed=7)
    for name in NAMES:
        registry.publish(adapter, name)
    started = [Replica(root / f"replica{i}", uri, tiny_base.path) for i in range(3)]
    try:
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.stop()


def served(replicas, count) -> list[dict[str, float]]:
    """Per replica: OK requests per adapter so far (``count`` scrapes one replica)."""
    return [count(r.metrics_port) for r in replicas]


def delta(after: list[dict[str, float]], before: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)} for a, b in zip(after, before)]


def owners(counts: list[dict[str, float]], rounds: int) -> dict[str, int]:
    """Adapter -> index of the one replica that served all ``rounds`` of its requests."""
    result = {}
    for name in NAMES:
        where = [(i, c.get(name, 0)) for i, c in enumerate(counts) if c.get(name, 0)]
        assert len(where) == 1 and where[0][1] == rounds, (name, where)  # every request on one replica
        result[name] = where[0][0]
    return result


def send_all(address: str, rounds: int = 1) -> None:
    with Client(address, timeout=60) as client:
        client.wait_ready(timeout=30)
        for _ in range(rounds):
            for name in NAMES:
                assert client.generate("hello", adapter=name, max_new_tokens=2).adapter.name == name


def wait_http(http: httpx.Client) -> None:
    """Until nginx accepts connections on its HTTP port (bounded)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            http.get("/v1/models")
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline, "nginx's HTTP port never accepted"
            time.sleep(0.1)


def complete(http: httpx.Client, model: str, headers: dict[str, str] | None = None) -> None:
    r = http.post("/v1/completions", headers=headers,
                  json={"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model.split(":")[0] + ":1"  # resolved NAME:VERSION


def check_http(proxy, replicas, count) -> None:
    """Through nginx's HTTP port, as a stock OpenAI client would (no X-Adapter): each adapter's
    requests, as ``NAME`` and ``NAME:1``, land on one replica; an X-Adapter header overrides
    the body; an SSE stream passes through whole."""
    def served_http():
        return served(replicas, lambda port: count(port, api="http"))

    with httpx.Client(base_url=f"http://{proxy.http_address}", timeout=60) as http:
        wait_http(http)
        start = served_http()
        for name in NAMES:
            complete(http, name)
            complete(http, f"{name}:1")
        home = owners(delta(served_http(), start), rounds=2)
        assert len(set(home.values())) >= 2, f"every adapter hashed onto one replica over HTTP: {home}"

        a = NAMES[0]
        b = next(n for n in NAMES if home[n] != home[a])
        before = served_http()
        complete(http, a, headers={"X-Adapter": b})
        moved = delta(served_http(), before)
        assert moved[home[b]] == {a: 1}, moved  # routed by the header, not the body

        events = []
        with http.stream("POST", "/v1/completions", json={"model": a, "prompt": "hello", "max_tokens": 4,
                                                           "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) >= 2, events
        assert all(json.loads(e)["model"] == f"{a}:1" for e in events[:-1])


def test_scale_out(replicas, run_nginx, ok_requests):
    count = ok_requests
    proxy = run_nginx([r.address for r in replicas], [r.http_address for r in replicas])

    # 1. affinity: 3 rounds over 24 adapters; each adapter's 3 requests on one replica
    start = served(replicas, count)
    send_all(proxy.address, rounds=3)
    home = owners(delta(served(replicas, count), start), rounds=3)
    used = sorted(set(home.values()))
    assert len(used) >= 2, f"every adapter hashed onto one replica: {home}"
    with Client(proxy.address, timeout=20) as client, pytest.raises(PermissionDenied):
        client.list_adapters()  # Admin RPCs are per replica, refused at the proxy
    check_http(proxy, replicas, count)

    # 2. scale in: nginx over all but the busiest replica (kept running: any request that still
    #    reached it would show in its metrics). Only the removed replica's adapters move.
    removed = max(used, key=lambda i: sum(1 for owner in home.values() if owner == i))
    kept = [r for i, r in enumerate(replicas) if i != removed]
    smaller = run_nginx([r.address for r in kept], [r.http_address for r in kept])
    before = served(replicas, count)
    send_all(smaller.address)
    now = owners(delta(served(replicas, count), before), rounds=1)
    assert removed not in now.values()
    for name, owner in home.items():
        if owner != removed:
            assert now[name] == owner, f"{name} moved from replica {owner} to {now[name]}"
    smaller.stop()

    # 3. drain: SIGTERM a replica while it streams a long generation; new requests for its
    #    adapters go to the others while it drains, none fails, the in-flight one completes.
    draining_index = next(i for i in used if i != removed)
    draining = replicas[draining_index]
    victim = next(name for name, owner in home.items() if owner == draining_index)
    with Client(proxy.address, timeout=300) as client, grpc.insecure_channel(draining.address) as direct:
        watch = health_pb2_grpc.HealthStub(direct).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stream = client.generate_stream("Once upon a time", adapter=victim, max_new_tokens=LONG)
        chunks = iter(stream)
        next(chunks)  # in flight on the draining replica now
        before = served(replicas, count)
        draining.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # draining has begun
        watch.cancel()
        moved = [n for n, owner in home.items() if owner == draining_index]
        for name in moved * 2:
            assert client.generate("hello", adapter=name, max_new_tokens=2).adapter.name == name
        assert draining.proc.poll() is None, "the replica exited before the new requests: not a drain test"
        others = [i for i in range(len(replicas)) if i != draining_index]
        after = served([replicas[i] for i in others], count)
        landed = delta(after, [before[i] for i in others])
        assert sum(sum(c.values()) for c in landed) == 2 * len(moved)  # all served by the other replicas
        for i, c in zip(others, landed):
            assert set(c) <= set(moved), (i, c)  # and only the moved adapters were new there
        rest = list(chunks)
        assert rest and stream.result.finish_reason in ("length", "eos") and stream.result.adapter.name == victim
        print(f"in-flight request completed during the drain: {stream.result.completion_tokens} tokens")
    assert draining.proc.wait(timeout=120) == 0
    send_all(proxy.address)  # with the drained replica gone, every adapter is still served
