"""The official ``openai`` client against the HTTP front end (batched engine, tiny model):
completions and chat, unary and streaming, model references, errors in OpenAI's shape,
and the SSE framing read raw with httpx."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from .conftest import base_url


def _base_id(bg) -> str:
    return bg.server.engine.base.id


def test_completion_unary_names_what_served_it(openai_client, http_server):
    raw = openai_client.completions.with_raw_response.create(model="alpha:1", prompt="The movie was", max_tokens=8,
                                                              temperature=0)
    resp = raw.parse()
    digest = raw.headers["x-adapterctl-adapter-digest"]
    assert resp.model == "alpha:1" and resp.system_fingerprint == digest and digest.startswith("sha256:")
    assert resp.object == "text_completion" and len(resp.choices) == 1
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8
    # the same request over gRPC gives the same greedy text
    from adapterctl.client import Client

    with Client(http_server.address, timeout=60) as grpc_client:
        assert grpc_client.generate("The movie was", adapter="alpha:1", max_new_tokens=8).text == resp.choices[0].text


@pytest.mark.parametrize("ref,expected", [("alpha", "alpha:2"), ("alpha:1", "alpha:1"), ("alpha:prod", "alpha:1")])
def test_model_takes_name_version_and_alias(openai_client, ref, expected):
    resp = openai_client.chat.completions.create(model=ref, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, temperature=0)
    assert resp.model == expected and resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant" and resp.usage.completion_tokens >= 1


def test_model_by_digest_and_base_id(openai_client, http_server, published):
    _, reg = published
    digest = reg.resolve("alpha:1").digest
    resp = openai_client.completions.create(model=f"alpha@{digest}", prompt="Hi", max_tokens=3, temperature=0)
    assert resp.model == "alpha:1" and resp.system_fingerprint == digest
    base = openai_client.completions.create(model=_base_id(http_server), prompt="Hi", max_tokens=3, temperature=0)
    assert base.model == _base_id(http_server)
    assert base.system_fingerprint == http_server.server.engine.base.fingerprint


def test_prompt_list_and_n_are_batched_in_choice_order(openai_client):
    single = [openai_client.completions.create(model="beta", prompt=p, max_tokens=6, temperature=0).choices[0].text
              for p in ("One", "Two")]
    resp = openai_client.completions.create(model="beta", prompt=["One", "Two"], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [single[0], single[0], single[1], single[1]]
    assert resp.usage.completion_tokens == 24


def test_streaming_completion_and_chat(openai_client):
    unary = openai_client.completions.create(model="gamma", prompt="Once", max_tokens=10, temperature=0)
    chunks = list(openai_client.completions.create(model="gamma", prompt="Once", max_tokens=10, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == unary.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert {c.model for c in chunks} == {"gamma:1"}

    messages = [{"role": "user", "content": "Tell me"}]
    chat = openai_client.chat.completions.create(model="gamma", messages=messages, max_tokens=10, temperature=0)
    stream = list(openai_client.chat.completions.create(model="gamma", messages=messages, max_tokens=10,
                                                        temperature=0, stream=True))
    assert stream[0].object == "chat.completion.chunk" and stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason in ("length", "stop")


def test_chat_max_completion_tokens_wins_over_max_tokens(openai_client):
    """OpenAI's newer ``max_completion_tokens`` takes precedence; ``max_tokens`` alone still bounds."""
    messages = [{"role": "user", "content": "Count"}]
    both = openai_client.chat.completions.create(model="gamma", messages=messages, max_tokens=9,
                                                 max_completion_tokens=3, temperature=0)
    alone = openai_client.chat.completions.create(model="gamma", messages=messages, max_tokens=5, temperature=0)
    for resp, limit in ((both, 3), (alone, 5)):
        reason, used = resp.choices[0].finish_reason, resp.usage.completion_tokens
        assert used <= limit and (reason == "stop" or used == limit), (reason, used, limit)


def test_models_lists_base_and_every_adapter_with_versions_and_aliases(openai_client, http_server):
    models = {m.id: m for m in openai_client.models.list().data}
    assert _base_id(http_server) in models
    assert {"alpha", "beta", "gamma", "delta", "wrongbase", "bigrank"} <= set(models)
    alpha = models["alpha"].model_dump()
    assert (
        [v["version"] for v in alpha["versions"]] == [1, 2]
        and alpha["aliases"]["prod"] == 1
        and alpha["aliases"]["latest"] == 2
    )


def test_errors_have_openai_shape_and_status(openai_client):
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.completions.create(model="nosuch", prompt="Hi", max_tokens=2)
    assert info.value.status_code == 404 and "nosuch" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):  # also before the stream starts
        openai_client.chat.completions.create(model="alpha:9", messages=[{"role": "user", "content": "x"}],
                                              stream=True)
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.completions.create(model="alpha", prompt="Hi", max_tokens=100000)
    assert "max_new_tokens" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model="alpha", messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        openai_client.completions.create(model="bad name!", prompt="Hi")
    with pytest.raises(openai.APIStatusError) as info:
        openai_client.completions.create(model="wrongbase", prompt="Hi", max_tokens=2)
    assert info.value.status_code == 412
    with pytest.raises(openai.APIStatusError) as info:
        openai_client.completions.create(model="bigrank", prompt="Hi", max_tokens=2)
    assert info.value.status_code == 412


def test_invalid_body_is_400_not_422(http_server):
    url = base_url(http_server)
    r = httpx.post(f"{url}/completions", json={"model": "alpha", "prompt": "x", "temperature": -1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(f"{url}/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_sse_framing_ends_with_done(http_server):
    body = {"model": "delta", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url(http_server)}/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-adapterctl-adapter-digest"].startswith("sha256:")
        raw = r.read().decode()
    events = [e for e in raw.replace("\r\n", "\n").split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert sum(1 for c in chunks if c["choices"][0]["finish_reason"] is None) >= 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["model"] == "delta:1"
