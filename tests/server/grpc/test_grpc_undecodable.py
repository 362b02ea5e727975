"""Bytes that are not a valid request message get INVALID_ARGUMENT on every RPC shape
(grpc's own answer for a deserializer exception is UNKNOWN), and the server keeps serving."""
from __future__ import annotations

import grpc
import pytest

from adapterctl.client import Client

GARBAGE = b"\xff\xff\xff\xff\x0f"  # a varint that never ends: "wire format was corrupt"


@pytest.mark.parametrize("method,streaming", [("/adapterctl.v1.Inference/Generate", False),
                                              ("/adapterctl.v1.Inference/GenerateStream", True),
                                              ("/adapterctl.v1.Admin/LoadAdapter", False)])
def test_undecodable_request_is_invalid_argument(echo_server, method, streaming):
    bg = echo_server()
    with grpc.insecure_channel(bg.address) as channel:
        call = (channel.unary_stream if streaming else channel.unary_unary)(method)
        with pytest.raises(grpc.RpcError) as info:
            result = call(GARBAGE, timeout=10)
            list(result) if streaming else None
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid protobuf message" in info.value.details()
    with Client(bg.address, timeout=10) as c:
        assert c.generate("still here").text == "still here"
