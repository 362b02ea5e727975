"""Shared parts of the reliability harness: an isolated home, a moto S3 server over HTTP,
random LoRA adapters written from the base config, and a server subprocess to start,
signal, sample (RSS) and stop."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INFER_TOKEN = "infer-" + uuid.uuid4().hex  # per run: the soak's logs are grepped for both
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
WORDS = ("the movie story actor scene great bad plot music film love time people world city night day life "
         "water house old new young small big light dark happy sad friend family school work food game").split()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prompt_texts(n: int, seed: int, words: int = 8) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() for _ in range(n)]


class AtomicWrites:
    """WSGI middleware serialising moto's mutating requests so its conditional writes
    (If-None-Match / If-Match) are atomic like S3's (same as tests/conftest.py)."""

    def __init__(self, app) -> None:
        self.app, self.lock = app, threading.Lock()

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") in ("PUT", "POST", "DELETE"):
            with self.lock:
                return list(self.app(environ, start_response))
        return self.app(environ, start_response)


class MotoS3:
    """moto's S3 app over HTTP on 127.0.0.1 in a thread; ``endpoint`` is its URL."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                           ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(key, value)
        try:  # keeps S3 metadata headers with underscores (moto >= 5.1.x)
            from moto.server import MotoRequestHandler as handler
        except ImportError:
            handler = None
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = make_server("127.0.0.1", 0, AtomicWrites(DomainDispatcherApplication(create_backend_app)),
                                   threaded=True, request_handler=handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def bucket(self) -> str:
        import boto3

        name = f"rel-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return name

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=30)


def write_adapter(out: Path, base: Any, seed: int, rank: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                  scale: float = 0.05) -> Path:
    """A PEFT LoRA directory for ``base`` (random A, small random B, so it changes the
    output), with the adapterctl.json lineage the registry accepts. Shapes from config.json:
    lora_A ``[r, hidden]``, lora_B ``[heads * head_dim, r]``."""
    import torch
    from safetensors.torch import save_file

    cfg = base.config()
    hidden, head_dim = cfg["hidden_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    outs = {"q_proj": cfg["num_attention_heads"] * head_dim, "k_proj": cfg["num_key_value_heads"] * head_dim,
            "v_proj": cfg["num_key_value_heads"] * head_dim}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for t in targets:
            key = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) * hidden ** -0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(outs[t], rank, generator=g) * scale
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    peft = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
            "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": base.id}
    (out / "adapter_config.json").write_text(json.dumps(peft))
    (out / "adapterctl.json").write_text(json.dumps({
        "format": "adapterctl.adapter/v1",
        "base_model": {"id": base.id, "fingerprint": base.fingerprint, "config": cfg},
        "lora": {"rank": rank, "alpha": 2 * rank, "target_modules": list(targets)}}))
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class ServerProc:
    """``adapterctl serve`` as a child process on 127.0.0.1:0 with bearer tokens and JSON logs.
    ``options`` are extra ``--flag value`` pairs; ``env`` extra environment."""

    workdir: Path
    registry: str
    base_model: str
    options: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    port: int = 0
    metrics_port: int | None = None
    http_port: int | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def start(self, timeout: float = 300) -> "ServerProc":
        self.workdir.mkdir(parents=True, exist_ok=True)
        tokens = self.workdir / "tokens.txt"
        tokens.write_text(f"{INFER_TOKEN} infer\n{ADMIN_TOKEN} admin\n")
        ready = self.workdir / "ready.json"
        ready.unlink(missing_ok=True)
        args = [sys.executable, "-m", "adapterctl.client.cli.main", "serve", "--port", "0", "--metrics-port", "0",
                "--http-port", "0",
                "--registry", self.registry, "--base-model", self.base_model,
                "--auth-token-file", str(tokens), "--ready-file", str(ready), "--log-json",
                "--cache-dir", str(self.workdir / "adapter-cache")]
        for key, value in self.options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}  # log lines reach the file at once
        self.starts += 1
        with self.log_path.open("a") as fh:
            fh.write(f'{{"harness": "start {self.starts}"}}\n')
            self.proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not ready.is_file():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not SERVING after {timeout}s; see {self.log_path}")
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        self.port, self.metrics_port, self.http_port = info["port"], info.get("metrics_port"), info.get("http_port")
        return self

    def metrics_text(self) -> str:
        import urllib.request

        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        """Log text written after byte ``offset`` (sliced as bytes: the log holds non-ASCII)."""
        return self.log_path.read_bytes()[offset:].decode("utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(30)


def metadata(token: str | None = INFER_TOKEN) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


@dataclass(frozen=True)
class Probe:
    """One greedy request whose answer must never change: ``adapter`` ref, ``prompt``, tokens."""

    adapter: str
    prompt: str
    max_new_tokens: int

    def request(self, request_id: str = ""):
        from adapterctl.v1 import adapterctl_pb2 as pb

        return pb.GenerateRequest(adapter=self.adapter, prompt=self.prompt, max_new_tokens=self.max_new_tokens,
                                  request_id=request_id)


async def greedy(address: str, probes: list[Probe], timeout: float = 300) -> list[tuple[str, tuple[int, ...], int]]:
    """``(text, token_ids, served version)`` of each probe, one at a time (an idle server)."""
    import grpc

    from adapterctl.v1 import adapterctl_pb2_grpc as pb_grpc

    out = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for p in probes:
            r = await stub.Generate(p.request(), metadata=metadata(), timeout=timeout)
            out.append((r.text, tuple(r.token_ids), r.adapter.version))
    return out


async def health_status(address: str, timeout: float = 5) -> str:
    """``SERVING`` / ``NOT_SERVING`` / the gRPC error code name."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        async with grpc.aio.insecure_channel(address) as channel:
            r = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


def publish_many(registry: Any, base: Any, root: Path, names: list[str], seed: int, rank: int = 4) -> dict[str, str]:
    """Publish one random adapter per name (version 1), 4 at a time; returns name -> digest."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item: tuple[int, str]) -> tuple[str, str]:
        i, name = item
        return name, registry.publish(write_adapter(root / name, base, seed + i, rank), name).digest

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, enumerate(names)))
