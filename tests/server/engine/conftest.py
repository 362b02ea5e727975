"""Fixtures for the batching-engine tests: PEFT adapters saved from the tiny base, an
in-memory adapter source (``cache.memory.MemoryStore``), and helpers that run an engine and collect its outputs."""
from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest

from adapterctl.server.types import GenerationRequest, GenerationResult, SamplingParams, ServedAdapter

# name -> LoraConfig kwargs; covers ranks {4, 8, 16, 64}, targets {q,v}, {q,k,v,o}, all linear, rsLoRA.
ADAPTER_SPECS: dict[str, dict[str, Any]] = {
    "r4-qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r8-qkvo": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r16-all-rslora": dict(r=16, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    "r64-all": dict(r=64, lora_alpha=32, target_modules="all-linear"),
}


@pytest.fixture(scope="session")
def tiny_model(tiny_base, test_device):
    """The tiny base model loaded once (fp32, on ``test_device``: the CPU unless set); deep-copy before changing it."""
    from adapterctl.basemodel import load_model

    return load_model(tiny_base, device=test_device)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base):
    from adapterctl.basemodel import load_tokenizer

    return load_tokenizer(tiny_base)


def save_peft_adapter(model, out: Path, seed: int, **lora_kwargs) -> Path:
    """A PEFT LoRA with random (non-zero) A and B, saved with ``save_pretrained``."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():  # PEFT's random B is small; make adapters change greedy choices
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="session")
def save_adapter():
    """``save_adapter(model, out_dir, seed, **LoraConfig kwargs) -> out_dir``."""
    return save_peft_adapter


@pytest.fixture(scope="session")
def peft_dirs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-adapters")
    return {name: save_peft_adapter(tiny_model, root / name, seed=i, **spec)
            for i, (name, spec) in enumerate(ADAPTER_SPECS.items())}


def load_dir(path: Path, base, name: str, max_rank: int = 64, version: int = 1):
    from adapterctl.server.cache.loaded import load_peft_dir

    served = ServedAdapter(name, version, "sha256:" + (name.encode().hex() * 64)[:64])
    return load_peft_dir(path, base, max_rank, served=served)


@pytest.fixture(scope="session")
def loaded_adapters(peft_dirs, tiny_base) -> dict[str, Any]:
    return {name: load_dir(path, tiny_base, name) for name, path in peft_dirs.items()}


@pytest.fixture
def make_engine(tiny_base, tiny_model, tiny_tokenizer, test_device):
    """``make_engine(store=None, **EngineConfig fields)`` -> a started BatchingEngine on a copy of
    the tiny model (on ``test_device`` unless ``device`` is given); stopped at teardown."""
    from adapterctl.server.engine.config import EngineConfig
    from adapterctl.server.engine.engine import BatchingEngine

    engines: list[BatchingEngine] = []
    loop = asyncio.new_event_loop()

    def make(store=None, **config):
        config.setdefault("device", test_device)
        config.setdefault("dtype", "float32")  # exact parity with fp32 PEFT, whatever "auto" picks here
        config.setdefault("gc_freeze", False)  # a full collection per start; test_gc_freeze.py tests the freeze
        engine = BatchingEngine(tiny_base, store, EngineConfig(**config), model=copy.deepcopy(tiny_model),
                                tokenizer=tiny_tokenizer)
        loop.run_until_complete(engine.start())
        engines.append(engine)
        return engine

    make.loop = loop
    yield make
    for engine in engines:
        loop.run_until_complete(engine.stop())
    loop.close()


@pytest.fixture
def run(make_engine):
    """``run(coro, timeout=60)``: run a coroutine on the engines' event loop, bounded in time."""

    def run_(coro, timeout: float = 60):
        return make_engine.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    return run_


async def _collect(engine, request: GenerationRequest) -> tuple[list, GenerationResult]:
    events = []
    async for item in engine.generate(request):
        if isinstance(item, GenerationResult):
            return events, item
        events.append(item)
    raise AssertionError("generate ended without a GenerationResult")


@pytest.fixture
def collect():
    """``await collect(engine, request) -> (token events, GenerationResult)``."""
    return _collect


@pytest.fixture
def request_for():
    """``request_for(prompt, max_new, adapter=None, rid="r", **SamplingParams) -> GenerationRequest``."""

    def make(prompt: list[int], max_new: int, adapter: str | None = None, rid: str = "r", **kw) -> GenerationRequest:
        return GenerationRequest(rid, list(prompt), SamplingParams(max_new_tokens=max_new, **kw), adapter)

    return make


@pytest.fixture
def dict_store(loaded_adapters):
    """A fresh in-memory store over the four test adapters."""
    from adapterctl.server.cache.memory import MemoryStore

    return MemoryStore(loaded_adapters)


@pytest.fixture(params=["c", "aten"])
def kernel(request, monkeypatch, test_device):
    """"c": the CPU LoRA kernel where it loads (lora_cpu; the calls that took it are counted in the
    returned list), "aten": it made unavailable, so the backends' ATen ops (CUDA's path) run."""
    from adapterctl.server.engine import lora_cpu

    if request.param == "c" and test_device != "cpu":
        pytest.skip("the CPU LoRA kernel takes CPU tensors only")
    if request.param == "aten":
        monkeypatch.setattr(lora_cpu, "library", lambda: None)
        return None
    if lora_cpu.library() is None:
        pytest.skip("no CPU LoRA kernel here (needs x86-64 with AVX2 and a C compiler)")
    calls: list[bool] = []
    real = lora_cpu.add
    monkeypatch.setattr(lora_cpu, "add", lambda *a: calls.append(real(*a)) or calls[-1])
    return calls
