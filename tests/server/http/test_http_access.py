"""Auth, the serving gate and metrics on the HTTP API (model-free EchoEngine): the same
bearer tokens as gRPC, 503 while loading, the ``api`` label on the request counter."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from .conftest import EchoEngine, base_url, scrape

INFER = "tok-http-infer-1f2e"


def test_bearer_token_required_when_auth_is_on(echo_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{INFER} infer\n")
    bg = echo_server(auth_token_file=tokens)
    with openai.OpenAI(base_url=base_url(bg), api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.completions.create(model="echo", prompt="hi", max_tokens=2)
        assert info.value.status_code == 401 and info.value.body["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    r = httpx.post(f"{base_url(bg)}/completions", json={"model": "echo", "prompt": "hi"}, timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    with openai.OpenAI(base_url=base_url(bg), api_key=INFER, max_retries=0) as ok:
        assert ok.completions.create(model="echo", prompt="hi", max_tokens=2).choices[0].text == "hi"
    m = scrape(bg.server.metrics_port)
    assert m[("adapterctl_auth_failures_total", (("code", "UNAUTHENTICATED"),))] == 3
    assert m[("adapterctl_requests_total", (("adapter", "echo"), ("api", "http"), ("code", "OK")))] == 1


def test_requests_count_under_their_api(echo_server):
    from adapterctl.client import Client

    bg = echo_server()
    with openai.OpenAI(base_url=base_url(bg), api_key="x", max_retries=0) as client:
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a"}], max_tokens=3)
        list(client.completions.create(model="echo", prompt="abc", max_tokens=3, stream=True))
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="abc")
    with Client(bg.address) as c:
        c.generate("hi", adapter="echo")
    m = scrape(bg.server.metrics_port)
    def get(api, code):
        return m.get(("adapterctl_requests_total", (("adapter", "echo"), ("api", api), ("code", code))))
    assert get("http", "OK") == 2 and get("grpc", "OK") == 1
    assert m[("adapterctl_requests_total", (("adapter", "__other__"), ("api", "http"), ("code", "NOT_FOUND")))] == 1


def test_503_while_loading_then_serving(tmp_path):
    from adapterctl.server.app import BackgroundServer
    from adapterctl.server.config import ServerConfig

    gate = asyncio.Event()
    bg = BackgroundServer(ServerConfig(port=0, metrics_port=-1, http_port=0),
                          lambda config, observer: EchoEngine(gate))
    bg.start(wait=False)
    try:
        url = f"http://127.0.0.1:{bg.server.http_port}/v1/completions"
        r = httpx.post(url, json={"model": "echo", "prompt": "early"}, timeout=30)
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        bg._loop.call_soon_threadsafe(gate.set)
        bg.wait_serving(30)
        r = httpx.post(url, json={"model": "echo", "prompt": "now", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "now"
    finally:
        bg.stop()


def test_http_off(echo_server):
    assert echo_server(http_port=-1).server.http_port is None
    assert echo_server(http=False).server.http_port is None
