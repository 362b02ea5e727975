"""Hostile HTTP inputs the reliability fuzz (bench/reliability/fuzz_http.py) found answered
500 or outside the documented error shape, kept as regression tests on the real server."""
from __future__ import annotations

import httpx
import pytest

from .conftest import base_url


def _is_error_json(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    return error


# JSON's \ud800 escape decodes to a lone surrogate: the tokenizer raised TypeError (500).
@pytest.mark.parametrize("route, body", [
    ("completions", b'{"model": "alpha", "prompt": "\\ud800", "max_tokens": 2}'),
    ("completions", b'{"model": "alpha", "prompt": ["ok", "a\\udfffb"], "max_tokens": 2}'),
    ("chat/completions", b'{"model": "alpha", "messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 2}'),
    ("completions", b'{"model": "alpha\\ud800", "prompt": "x", "max_tokens": 2}'),
    ("completions", b'{"model": "alpha", "prompt": "x", "stop": ["\\udc00"], "max_tokens": 2}'),
])
def test_lone_surrogate_is_400_and_the_server_keeps_serving(http_server, route, body):
    url = base_url(http_server)
    r = httpx.post(f"{url}/{route}", content=body, headers={"content-type": "application/json"}, timeout=60)
    error = _is_error_json(r, 400)
    assert "surrogate" in error["message"] and error["code"] == "invalid_argument"
    ok = httpx.post(f"{url}/completions", json={"model": "alpha", "prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_a_surrogate_pair_is_text(http_server):
    r = httpx.post(f"{base_url(http_server)}/completions", timeout=60, headers={"content-type": "application/json"},
                   content=b'{"model": "alpha", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}')
    assert r.status_code == 200, r.text


# Starlette's trailing-slash redirect answered an empty 307 (no error JSON).
@pytest.mark.parametrize("method, path", [("GET", "/v1/models/"), ("POST", "/v1/completions/"),
                                          ("POST", "/v1/chat/completions/")])
def test_trailing_slash_is_a_404_error_not_a_redirect(http_server, method, path):
    port = http_server.server.http_port
    r = httpx.request(method, f"http://127.0.0.1:{port}{path}", json={}, timeout=30, follow_redirects=False)
    assert _is_error_json(r, 404)["type"] == "not_found_error"
