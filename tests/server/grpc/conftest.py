"""Fixtures for the gRPC service tests: tiny PEFT adapters published to a real registry,
servers on 127.0.0.1 port 0 (reference engine, or a model-free fake engine for
auth/TLS/lifecycle), and a /metrics scraper."""
from __future__ import annotations

import asyncio
import copy
import json
import threading
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from adapterctl.errors import NotFound
from adapterctl.server.types import (
    FINISH_LENGTH,
    AdapterStatus,
    GenerationRequest,
    GenerationResult,
    ServedAdapter,
    TokenEvent,
)

WRONG_FINGERPRINT = "sha256:" + "0" * 64


@pytest.fixture(scope="session")
def tiny_hf(tiny_base):
    from adapterctl.basemodel import load_model

    return load_model(tiny_base, device="cpu")


@pytest.fixture(scope="session")
def make_adapter(tiny_hf, tiny_base, tmp_path_factory) -> Callable[..., Path]:
    """``make_adapter(name, seed=0, r=4, fingerprint=None) -> dir``: a PEFT LoRA on the tiny
    base (random B, so it changes outputs) with an adapterctl.json the registry accepts."""
    import torch
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("grpc-adapters")

    def make(name: str, seed: int = 0, r: int = 4, fingerprint: str | None = None) -> Path:
        out = root / name
        if out.exists():
            return out
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(tiny_hf), LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                                                   target_modules=["q_proj", "v_proj"]))
        model.save_pretrained(str(out))
        (out / "README.md").unlink(missing_ok=True)
        (out / "adapterctl.json").write_text(json.dumps({
            "format": "adapterctl.adapter/v1",
            "base_model": {"id": tiny_base.id, "fingerprint": fingerprint or tiny_base.fingerprint,
                           "config": tiny_base.config()},
            "lora": {"rank": r, "alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]}}))
        return out

    return make


@pytest.fixture(scope="session")
def published(tmp_path_factory, make_adapter):
    """A local registry holding alpha:1/2 (prod -> 1), beta, gamma, delta, wrongbase
    (another base's fingerprint) and bigrank (r=16). Returns (uri, registry)."""
    from adapterctl.registry import open_registry

    uri = f"file://{tmp_path_factory.mktemp('grpc-registry')}"
    reg = open_registry(uri)
    reg.publish(make_adapter("alpha1", seed=1), "alpha")
    reg.publish(make_adapter("alpha2", seed=2), "alpha")
    reg.promote("alpha", 1, "prod")
    for i, name in enumerate(("beta", "gamma", "delta")):
        reg.publish(make_adapter(name, seed=10 + i), name)
    reg.publish(make_adapter("wrongbase", seed=3, fingerprint=WRONG_FINGERPRINT), "wrongbase")
    reg.publish(make_adapter("bigrank", seed=4, r=16), "bigrank")
    return uri, reg


def start_server(tmp_path: Path, engine_factory=None, **overrides: Any):
    """A BackgroundServer on 127.0.0.1:0 (metrics and HTTP on :0), started and SERVING;
    ``overrides`` are flat ServerConfig settings (any level of the tree, by name)."""
    from adapterctl.options import from_kwargs
    from adapterctl.server.app import BackgroundServer
    from adapterctl.server.build import build_engine
    from adapterctl.server.config import ServerConfig

    settings: dict[str, Any] = dict(port=0, metrics_port=0, http_port=0, alias_refresh=0,
                                    shutdown_grace=2, cache_dir=tmp_path / "adapter-cache")
    settings.update(overrides)
    return BackgroundServer(from_kwargs(ServerConfig, settings), engine_factory or build_engine).start()


def _engine_server(tmp_path_factory, published, tiny_base):
    uri, _ = published
    bg = start_server(tmp_path_factory.mktemp("grpc-server"), uri=uri,
                      alias_refresh=3600,  # aliases move only through the RefreshAliases RPC here
                      base_model=str(tiny_base.path), max_lora_rank=8, max_waiting=1, max_running_requests=1,
                      metrics_max_adapters=3, max_new_tokens_limit=2000, max_prompt_tokens=40,
                      dtype="float32")  # tests compare with fp32 PEFT; auto picks bf16 on AMX hosts
    yield bg
    bg.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory, published, tiny_base):
    """A server over ``published``, shared by the test modules: one request runs at a
    time (max_running_requests 1) and one may wait (max_waiting 1); max_lora_rank 8;
    metrics label cap 3; prompts up to 2000 tokens."""
    yield from _engine_server(tmp_path_factory, published, tiny_base)


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory, published, tiny_base):
    """Like ``server`` but private to one module (for exact metric counts)."""
    yield from _engine_server(tmp_path_factory, published, tiny_base)


@pytest.fixture(scope="module")
def start_batched(tmp_path_factory, tiny_base):
    """``start_batched(registry_uri, **config) -> BackgroundServer``: the batching engine on
    the tiny base with room for concurrent requests (8 running, 64 waiting), aliases moved
    only by RefreshAliases; stopped at the end of the module."""
    started = []

    def start(registry_uri: str, **overrides: Any):
        settings: dict[str, Any] = dict(uri=registry_uri, alias_refresh=3600,
                                        base_model=str(tiny_base.path), max_lora_rank=8, max_running_requests=8,
                                        max_waiting=64, max_new_tokens_limit=2000, max_prompt_tokens=40)
        settings.update(overrides)
        started.append(start_server(tmp_path_factory.mktemp("batched-server"), **settings))
        return started[-1]

    yield start
    for bg in started:
        bg.stop()


@pytest.fixture
def client(server):
    from adapterctl.client import Client

    with Client(server.address, timeout=60) as c:
        yield c


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted label items): value}`` from /metrics on 127.0.0.1:port."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def metrics_of():
    return scrape


# ---- a model-free engine for auth / TLS / lifecycle tests ------------------------------------
class CharTokenizer:
    """Token id = code point; enough for the servicer's prompt handling."""

    pad_token_id = 0
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True):
        return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()

    def apply_chat_template(self, turns, tokenize=False, add_generation_prompt=True):
        if self.chat_template:  # a --chat-template override
            import jinja2

            return jinja2.Template(self.chat_template).render(messages=turns,
                                                              add_generation_prompt=add_generation_prompt)
        return "".join(f"<{t['role']}>{t['content']}" for t in turns) + ("<model>" if add_generation_prompt else "")


class EchoEngine:
    """Echoes the prompt back one character per token and serves any adapter named echo*
    (as version 1); ``gate`` (an asyncio.Event) delays start()."""

    max_new_tokens_limit = 1024
    max_prompt_tokens = 1000
    device = "cpu"
    features: frozenset[str] = frozenset()  # neither logprobs nor response_format

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.tokenizer = CharTokenizer()
        self._gate = gate
        self.refreshed = threading.Event()  # set by refresh_aliases (the server's watch loop calls it)

    async def start(self) -> None:
        if self._gate is not None:
            await self._gate.wait()

    async def stop(self) -> None:
        pass

    async def generate(self, request: GenerationRequest):
        served = None
        if request.adapter:
            if not request.adapter.startswith("echo"):
                raise NotFound(f"adapter {request.adapter!r} not found")
            served = ServedAdapter(request.adapter.split(":")[0].split("@")[0], 1, "sha256:" + "e" * 64)
        ids = request.prompt_ids[: request.sampling.max_new_tokens]
        for token in ids:
            await asyncio.sleep(0)
            yield TokenEvent([token], chr(token))
        yield GenerationResult(request.request_id, "".join(map(chr, ids)), list(ids), FINISH_LENGTH,
                               len(request.prompt_ids), served)

    async def list_adapters(self, name=None):
        return [AdapterStatus("echo", 1, "sha256:" + "e" * 64, "device")]

    async def load_adapter(self, ref):
        return (await self.list_adapters())[0]

    unload_adapter = load_adapter

    async def pin_adapter(self, ref, pinned):
        return (await self.list_adapters())[0]

    async def refresh_aliases(self):
        self.refreshed.set()
        return [("echo", "prod", 1, 2)]


@pytest.fixture
def make_server(tmp_path):
    """``make_server(engine_factory=None, **config) -> BackgroundServer``; stopped after the test."""
    started = []

    def make(engine_factory=None, **overrides: Any):
        bg = start_server(tmp_path, engine_factory, **overrides)
        started.append(bg)
        return bg

    yield make
    for bg in started:
        bg.stop()


@pytest.fixture
def echo_server(make_server):
    """``echo_server(**config) -> BackgroundServer`` with the model-free EchoEngine."""
    return lambda **overrides: make_server(lambda config, observer: EchoEngine(), **overrides)


@pytest.fixture
def echo_engine_cls():
    return EchoEngine
