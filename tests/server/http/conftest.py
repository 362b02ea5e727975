"""Fixtures for the HTTP front-end tests: the gRPC tests' published registry and
server helpers (loaded from ../grpc/conftest.py), a batched-engine server with HTTP on
127.0.0.1 port 0, and official OpenAI clients pointed at it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("_grpc_fixtures", Path(__file__).parents[1] / "grpc" / "conftest.py")
_grpc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_grpc)
tiny_hf, make_adapter, published, metrics_of, make_server, echo_server = (
    _grpc.tiny_hf, _grpc.make_adapter, _grpc.published, _grpc.metrics_of, _grpc.make_server, _grpc.echo_server)
start_server, scrape, EchoEngine = _grpc.start_server, _grpc.scrape, _grpc.EchoEngine


@pytest.fixture(scope="module")
def http_server(tmp_path_factory, published, tiny_base):
    """A batched-engine server over ``published`` with gRPC, HTTP and metrics on free ports."""
    uri, _ = published
    bg = start_server(tmp_path_factory.mktemp("http-server"), uri=uri, alias_refresh=3600,
                      base_model=str(tiny_base.path), max_lora_rank=8, max_running_requests=8,
                      max_new_tokens_limit=256, max_prompt_tokens=200,
                      dtype="float32")  # tests compare with fp32 PEFT; auto picks bf16 on AMX hosts
    yield bg
    bg.stop()


def base_url(bg) -> str:
    return f"http://127.0.0.1:{bg.server.http_port}/v1"


@pytest.fixture
def openai_client(http_server):
    import openai

    with openai.OpenAI(base_url=base_url(http_server), api_key="unused", max_retries=0, timeout=120) as client:
        yield client
