"""Logprobs and JSON-constrained output through both APIs, HTTP and gRPC requests in
the same engine batches, and a client disconnecting mid-stream (tiny model, batched engine)."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import jsonschema
import pytest
import torch

from adapterctl.v1 import adapterctl_pb2 as pb
from adapterctl.v1 import adapterctl_pb2_grpc as pb_grpc

from .conftest import base_url, scrape

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 12},
    "rating": {"type": "integer", "minimum": 1, "maximum": 5},
    "mood": {"enum": ["good", "bad", "meh"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    "cast": {"type": "object", "properties": {"lead": {"type": "string", "maxLength": 10}}, "required": ["lead"],
             "additionalProperties": False}},
    "required": ["title", "rating", "mood", "tags", "cast"], "additionalProperties": False}


@pytest.fixture(scope="module")
def stub(http_server):
    with grpc.insecure_channel(http_server.address) as channel:
        yield pb_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def peft_alpha1(tiny_base, make_adapter):
    from peft import PeftModel

    from adapterctl.basemodel import load_model, load_tokenizer

    model = PeftModel.from_pretrained(load_model(tiny_base, device="cpu"), str(make_adapter("alpha1", seed=1))).eval()
    return model, load_tokenizer(tiny_base)


def _reference_logprobs(model, prompt_ids: list[int], output: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) ``[len(output), vocab]`` of the stock PEFT model at each generated position."""
    ids = torch.tensor([prompt_ids + output[:-1]])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def test_logprobs_equal_reference_log_softmax_both_apis(http_server, stub, peft_alpha1):
    model, tok = peft_alpha1
    prompt = "A witty review:"
    ids = tok(prompt).input_ids
    body = {"model": "alpha:1", "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 3}
    http = httpx.post(f"{base_url(http_server)}/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    got = stub.Generate(pb.GenerateRequest(adapter="alpha:1", prompt=prompt, max_new_tokens=8, logprobs=True,
                                           top_logprobs=3), timeout=60)
    output = list(got.token_ids)
    ref = _reference_logprobs(model, ids, output)
    expected = ref[torch.arange(len(output)), torch.tensor(output)]
    assert torch.allclose(torch.tensor([lp.logprob for lp in got.logprobs]), expected, atol=1e-4)
    assert torch.allclose(torch.tensor(http["token_logprobs"]), expected, atol=1e-4)
    assert http["tokens"] == [tok.decode([t]) for t in output]
    for i, lp in enumerate(got.logprobs):
        top = ref[i].topk(3)
        assert [t.token_id for t in lp.top_logprobs] == top.indices.tolist()
        assert torch.allclose(torch.tensor([t.logprob for t in lp.top_logprobs]), top.values, atol=1e-4)
        assert list(http["top_logprobs"][i].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    # sampled: the distribution after temperature, in chat's layout, streamed
    sampled = stub.Generate(pb.GenerateRequest(adapter="alpha:1", prompt=prompt, max_new_tokens=6, logprobs=True,
                                               temperature=0.7, seed=3), timeout=60)
    ref = _reference_logprobs(model, ids, list(sampled.token_ids), temperature=0.7)
    expected = ref[torch.arange(6), torch.tensor(list(sampled.token_ids))]
    assert torch.allclose(torch.tensor([lp.logprob for lp in sampled.logprobs]), expected, atol=1e-4)
    chunks = list(stub.GenerateStream(pb.GenerateRequest(adapter="alpha:1", prompt=prompt, max_new_tokens=6,
                                                         logprobs=True, temperature=0.7, seed=3), timeout=60))
    streamed = [lp.logprob for c in chunks if c.HasField("chunk") for lp in c.chunk.logprobs]
    assert streamed == [lp.logprob for lp in sampled.logprobs]


def test_chat_logprobs_layout(openai_client):
    resp = openai_client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy picks the top token
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_json_schema_output_validates_and_neighbours_keep_greedy(http_server, openai_client, stub):
    """Constrained rows (HTTP, gRPC) share batches with unconstrained ones, whose greedy text is unchanged."""
    prompts = [f"Review number {i}:" for i in range(4)]
    alone = {p: openai_client.completions.create(model="gamma", prompt=p, max_tokens=24, temperature=0)
             .choices[0].text for p in prompts}

    def constrained_http(i: int) -> str:
        resp = openai_client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": f"Describe film {i} as JSON."}], max_tokens=120,
            temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA}})
        assert resp.choices[0].finish_reason == "stop"
        return resp.choices[0].message.content

    def constrained_grpc(i: int) -> str:
        fmt = pb.ResponseFormat(type="json_schema", json_schema=json.dumps(SCHEMA))
        return stub.Generate(pb.GenerateRequest(adapter="beta", prompt=f"Film {i} as JSON:", max_new_tokens=120,
                                                response_format=fmt), timeout=300).text

    def plain(p: str) -> str:
        return openai_client.completions.create(model="gamma", prompt=p, max_tokens=24, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(constrained_http, i) for i in range(3)] + [
            pool.submit(constrained_grpc, i) for i in range(3)
        ]
        neighbours = {p: pool.submit(plain, p) for p in prompts}
        outputs = [j.result(timeout=600) for j in jobs]
    for text in outputs:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert {p: f.result() for p, f in neighbours.items()} == alone


def test_unsupported_schema_is_invalid_argument_naming_it(openai_client, stub):
    import openai

    bad = {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
    assert "definitions/missing" in info.value.body["message"]
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="x", response_format=pb.ResponseFormat(
            type="json_schema", json_schema=json.dumps(bad))), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "definitions/missing" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="x", response_format=pb.ResponseFormat(type="yaml")), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_http_and_grpc_share_batches_with_peft_greedy_text(http_server, stub, peft_alpha1, tiny_base, make_adapter):
    """Different adapters through both APIs at once run in the same engine steps; the greedy
    tokens are the same through either API and equal stock PEFT's."""
    from peft import PeftModel

    from adapterctl.basemodel import load_model

    _, tok = peft_alpha1
    engine = http_server.server.engine
    steps: list[set[str]] = []
    engine.logits_hook = lambda seqs, logits: steps.append({s.request.request_id for s in seqs})
    prompt, n = "The film", 16
    barrier = threading.Barrier(4)

    def via_http(model: str, rid: str) -> list[str]:
        barrier.wait(30)
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 0}
        r = httpx.post(f"{base_url(http_server)}/completions", json=body, headers={"x-request-id": rid}, timeout=120)
        return r.json()["choices"][0]["logprobs"]["tokens"]  # one entry per generated token

    def via_grpc(adapter: str, rid: str) -> list[str]:
        barrier.wait(30)
        got = stub.Generate(pb.GenerateRequest(adapter=adapter, prompt=prompt, max_new_tokens=n, request_id=rid),
                            timeout=120)
        return [tok.decode([t]) for t in got.token_ids]

    try:
        with ThreadPoolExecutor(4) as pool:
            jobs = {"h-alpha": pool.submit(via_http, "alpha:1", "h-alpha"),
                    "h-delta": pool.submit(via_http, "delta", "h-delta"),
                    "g-beta": pool.submit(via_grpc, "beta", "g-beta"),
                    "g-alpha": pool.submit(via_grpc, "alpha:1", "g-alpha")}
            out = {k: j.result(timeout=300) for k, j in jobs.items()}
    finally:
        engine.logits_hook = None
    mixed = [s for s in steps if any(r.startswith("h-") for r in s) and any(r.startswith("g-") for r in s)]
    assert mixed, steps  # some decode step ran HTTP and gRPC rows together
    assert out["h-alpha"] == out["g-alpha"]  # same tokens through both APIs
    ids = tok(prompt, return_tensors="pt").input_ids
    for key, adapter in (("g-alpha", "alpha1"), ("g-beta", "beta"), ("h-delta", "delta")):
        model = PeftModel.from_pretrained(load_model(tiny_base, device="cpu"), str(make_adapter(adapter))).eval()
        with torch.inference_mode():
            ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        expected = ref[0, ids.shape[1]:].tolist()
        assert out[key] == [tok.decode([t]) for t in expected][:len(out[key])], key


def test_disconnect_mid_stream_frees_the_slot(http_server):
    engine = http_server.server.engine
    body = {"model": "delta", "prompt": "Once upon a time", "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{base_url(http_server)}/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert len(engine.scheduler.running) == 1
        # leaving the block closed the connection after one chunk
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (engine.scheduler.running or
                                           scrape(http_server.server.metrics_port)[
                                               ("adapterctl_engine_running_requests", ())] != 0):
        time.sleep(0.05)
    assert not engine.scheduler.running
    m = scrape(http_server.server.metrics_port)
    assert m[("adapterctl_engine_running_requests", ())] == 0
    assert m.get(("adapterctl_requests_total", (("adapter", "delta"), ("api", "http"), ("code", "CANCELLED"))), 0) >= 1


def test_client_giving_up_on_a_unary_request_frees_the_row(http_server):
    engine = http_server.server.engine
    body = {"model": "delta", "prompt": "Once upon a time", "max_tokens": 250, "temperature": 0}
    url = httpx.URL(base_url(http_server))
    payload = json.dumps(body).encode()
    with socket.create_connection((url.host, url.port), timeout=30) as sock:  # a client that will give up
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(payload), payload))
        deadline = time.monotonic() + 30  # the request is admitted and generating ...
        while not engine.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(engine.scheduler.running) == 1
    # ... when the client closes the connection without reading an answer
    deadline = time.monotonic() + 30
    while engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.scheduler.running  # not 250 tokens for nobody
    m = scrape(http_server.server.metrics_port)
    assert m[("adapterctl_requests_total", (("adapter", "delta"), ("api", "http"), ("code", "CANCELLED")))] >= 1


def test_deadline_header_gives_504_and_frees_the_row(http_server):
    engine = http_server.server.engine
    body = {"model": "delta", "prompt": "Once upon a time", "max_tokens": 250, "temperature": 0}
    r = httpx.post(f"{base_url(http_server)}/completions", json=body, headers={"x-adapterctl-timeout": "0.2"},
                   timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    r = httpx.post(f"{base_url(http_server)}/completions", json=body, headers={"x-adapterctl-timeout": "soon"},
                   timeout=60)
    assert r.status_code == 400
    deadline = time.monotonic() + 30
    while engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.scheduler.running
    m = scrape(http_server.server.metrics_port)
    assert m[("adapterctl_requests_total", (("adapter", "delta"), ("api", "http"), ("code", "DEADLINE_EXCEEDED")))] >= 1
