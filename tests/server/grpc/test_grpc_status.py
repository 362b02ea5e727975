"""Every row of the status-code table over a real port, and the server keeps serving after each."""
from __future__ import annotations

import threading

import grpc
import pytest

from adapterctl.v1 import adapterctl_pb2 as pb
from adapterctl.v1 import adapterctl_pb2_grpc as pb_grpc


def _code(stub_call, request, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        stub_call(request, **kw)
    return info.value.code()


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.InferenceStub(channel)


def test_ok_reports_the_served_adapter_exactly(client, published):
    _, reg = published
    result = client.generate("The movie was", adapter="alpha:prod", max_new_tokens=4)
    assert result.adapter is not None
    assert (result.adapter.name, result.adapter.version) == ("alpha", 1)
    assert result.adapter.digest == reg.resolve("alpha:1").digest
    assert result.completion_tokens == len(result.token_ids) >= 1 and result.prompt_tokens > 0
    base = client.generate("The movie was", max_new_tokens=4)
    assert base.adapter is None and base.token_ids != result.token_ids


@pytest.mark.parametrize("adapter", ["nosuch", "alpha:9", "alpha:staging", "alpha@sha256:" + "a" * 64])
def test_unknown_adapter_or_version_is_not_found(stub, client, adapter):
    assert _code(stub.Generate, pb.GenerateRequest(prompt="hi", adapter=adapter, max_new_tokens=2)) \
        == grpc.StatusCode.NOT_FOUND
    assert client.generate("still serving", max_new_tokens=2).completion_tokens >= 1


@pytest.mark.parametrize("fields", [
    {"max_new_tokens": -1}, {"max_new_tokens": 2001}, {"temperature": -0.5}, {"temperature": float("nan")},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"stop": [""]}, {"adapter": "../etc"}, {"adapter": "alpha:0"},
    {"prompt": ""}, {"messages": [pb.ChatMessage(role="user", content="x")]},
    {"prompt": "", "messages": [pb.ChatMessage(role="robot", content="x")]},
    {"prompt": "", "messages": [pb.ChatMessage(role="assistant", content="x")]},  # template: roles must alternate
    {"prompt": "word " * 50},  # over the server's 40-token prompt limit
])
def test_bad_arguments_are_invalid_argument(stub, client, fields):
    request = pb.GenerateRequest(prompt="hi", max_new_tokens=2)
    for key, value in fields.items():
        if key == "messages":
            request.messages.extend(value)
        elif key == "stop":
            request.stop.extend(value)
        else:
            setattr(request, key, value)
    assert _code(stub.Generate, request) == grpc.StatusCode.INVALID_ARGUMENT
    assert client.generate("still serving", max_new_tokens=2).completion_tokens >= 1


def test_stream_rejects_bad_arguments_with_the_same_code(stub):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateStream(pb.GenerateRequest(prompt="hi", temperature=-1)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("adapter", ["wrongbase", "bigrank"])  # other base; rank 16 > max_lora_rank 8
def test_incompatible_adapter_is_failed_precondition(stub, client, adapter):
    assert _code(stub.Generate, pb.GenerateRequest(prompt="hi", adapter=adapter, max_new_tokens=2)) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert client.generate("still serving", max_new_tokens=2).completion_tokens >= 1


def test_deadline_is_deadline_exceeded_and_frees_the_engine(stub, client):
    long = pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=1900)
    assert _code(stub.Generate, long, timeout=0.5) == grpc.StatusCode.DEADLINE_EXCEEDED
    # The abandoned request (~2000 tokens, tens of seconds) must not hold the single worker.
    assert client.generate("next", max_new_tokens=2, timeout=15).completion_tokens >= 1


def test_queue_full_is_resource_exhausted(server, stub, client, metrics_of):
    """max_waiting=1: one running, one waiting, the third is refused."""
    running = stub.GenerateStream(pb.GenerateRequest(prompt="Once", max_new_tokens=1900))
    next(running)  # the first chunk: it holds the worker now
    waiting_done = threading.Event()
    waiting_result: list = []

    def wait_in_line() -> None:
        waiting_result.append(client.generate("queued", max_new_tokens=2, timeout=60))
        waiting_done.set()

    thread = threading.Thread(target=wait_in_line)
    thread.start()
    key = ("adapterctl_engine_waiting_requests", ())
    for _ in range(200):  # bounded: the running stream reports the queue on every token
        if metrics_of(server.server.metrics_port).get(key) == 1:
            break
        next(running)
    else:
        pytest.fail("the second request never showed up as waiting")
    try:
        assert _code(stub.Generate, pb.GenerateRequest(prompt="one too many", max_new_tokens=2)) \
            == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.cancel()
    assert waiting_done.wait(30) and waiting_result[0].completion_tokens >= 1
    thread.join(5)
    rejected = metrics_of(server.server.metrics_port)[("adapterctl_engine_queue_rejections_total", ())]
    assert rejected >= 1


def test_unreachable_registry_is_unavailable(make_server, tiny_base, monkeypatch):
    """An S3 registry nobody listens on: adapter requests fail UNAVAILABLE, base requests still work."""
    from adapterctl.client import Client

    for key, value in {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    bg = make_server(uri="s3://nowhere/adapters", base_model=str(tiny_base.path))
    with grpc.insecure_channel(bg.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        assert _code(stub.Generate, pb.GenerateRequest(prompt="hi", adapter="alpha", max_new_tokens=2),
                     timeout=60) == grpc.StatusCode.UNAVAILABLE
    with Client(bg.address) as c:
        assert c.generate("base still works", max_new_tokens=2).adapter is None


def test_corrupt_registry_blob_is_data_loss(server, stub, client, published, make_adapter):
    """Stored adapter bytes that no longer match their sha256 -> DATA_LOSS, nothing served."""
    from pathlib import Path

    uri, reg = published
    name = "corrupt"
    manifest = reg.publish(make_adapter(name, seed=99), name)
    weights = next(f for f in manifest.files if f.path.endswith(".safetensors"))
    blob = Path(uri.removeprefix("file://")) / "blobs/sha256" / weights.digest.partition(":")[2]
    blob.write_bytes(b"\0" * blob.stat().st_size)
    assert _code(stub.Generate, pb.GenerateRequest(prompt="hi", adapter=name, max_new_tokens=2)) \
        == grpc.StatusCode.DATA_LOSS
    assert client.generate("still serving", max_new_tokens=2).completion_tokens >= 1
