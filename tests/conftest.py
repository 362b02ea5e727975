"""Shared fixtures: an isolated ADAPTERCTL_HOME, a real moto S3 server over HTTP on
127.0.0.1, a tiny random-weight Gemma 3 (real tokenizer) and the real Gemma 3 270M.

The converted base models are cached across runs in ``$ADAPTERCTL_TEST_CACHE``
(default ``~/.cache/adapterctl-test``) because converting the GGUF takes ~1 min;
everything else a test writes lives under pytest's tmp_path.
"""
from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest

TEST_CACHE = Path(os.environ.get("ADAPTERCTL_TEST_CACHE") or Path.home() / ".cache" / "adapterctl-test")


@pytest.fixture(scope="session", autouse=True)
def adapterctl_home(tmp_path_factory) -> Path:
    """Every test session gets its own home (registry, adapter caches) but shares
    the converted models through a symlinked ``models/`` cache."""
    home = tmp_path_factory.mktemp("adapterctl-home")
    (TEST_CACHE / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(TEST_CACHE / "models", target_is_directory=True)
    os.environ["ADAPTERCTL_HOME"] = str(home)
    os.environ.pop("ADAPTERCTL_REGISTRY", None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return home


class _AtomicWrites:
    """WSGI middleware giving the moto server S3's atomic conditional writes.

    Real S3 evaluates ``If-None-Match``/``If-Match`` and applies the write as one
    step; moto checks, then writes, so two racing requests could both pass the
    check. Serialising mutating requests closes that window; reads stay concurrent.
    """

    def __init__(self, app) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") in ("PUT", "POST", "DELETE"):
            with self.lock:
                return list(self.app(environ, start_response))
        return self.app(environ, start_response)


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 endpoint (moto's server app over HTTP on 127.0.0.1, in a thread)."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    try:  # keeps S3 metadata headers with underscores (moto >= 5.1.x)
        from moto.server import MotoRequestHandler as handler
    except ImportError:
        handler = None
    app = _AtomicWrites(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    thread.join(timeout=30)


@pytest.fixture
def s3_bucket(moto_server) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_registry_uri(s3_bucket, moto_server, monkeypatch) -> str:
    """An ``s3://`` registry URI on the moto server (AWS_ENDPOINT_URL points at it)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return f"s3://{s3_bucket}/adapters"


@pytest.fixture(scope="session")
def gemma_base(adapterctl_home):
    """The real Gemma 3 270M (converted from the packaged GGUF once, then cached)."""
    from adapterctl.basemodel import resolve_base_model

    return resolve_base_model("gemma-3-270m", progress=False)


@pytest.fixture(scope="session")
def tiny_base(request):
    """A tiny random-weight Gemma 3 (2 layers, hidden 64) with the real tokenizer and chat template.

    Built once from the real Gemma 3 270M's tokenizer (bench/random_base.py) and cached; a
    machine without the converted Gemma (the device check) builds it into the cache beforehand."""
    from adapterctl.basemodel import resolve_base_model

    target = TEST_CACHE / "models" / "tiny-gemma3"
    if not (target / "config.json").is_file():
        from bench import random_base

        random_base.build(target, request.getfixturevalue("gemma_base").path, random_base.tiny_config())
    return resolve_base_model(str(target), progress=False)


@pytest.fixture(scope="session")
def test_device() -> str:
    """The torch device of the engine parity tests' models and engines: ``ADAPTERCTL_TEST_DEVICE``
    (default cpu; cuda on a GPU machine, bench/device_check.py). On CUDA, fp32 matmuls run
    without TF32, so fp32 parity stays within the same bounds as on the CPU."""
    device = os.environ.get("ADAPTERCTL_TEST_DEVICE", "cpu")
    if device != "cpu":
        import torch

        if not (device.startswith("cuda") and torch.cuda.is_available()):
            pytest.exit(f"ADAPTERCTL_TEST_DEVICE={device}: torch sees no such device", returncode=2)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device
