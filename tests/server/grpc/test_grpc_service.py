"""Service plumbing with the model-free engine: reflection, --chat-template, the alias
watch loop, structured (JSON) request logs."""
from __future__ import annotations

import json
import logging

import grpc

from adapterctl.client import Client


def test_reflection_lists_every_service(echo_server):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    bg = echo_server()
    with grpc.insecure_channel(bg.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"adapterctl.v1.Inference", "adapterctl.v1.Admin", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(db)
        method = pool.FindServiceByName("adapterctl.v1.Inference").methods_by_name["GenerateStream"]
        assert method.output_type.full_name == "adapterctl.v1.GenerateStreamResponse"


def test_chat_template_override(echo_server, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[bot]{% endif %}")
    bg = echo_server(chat_template=template)
    with Client(bg.address, timeout=10) as c:
        assert c.chat([("user", "hi")]).text == "[user] hi\n[bot]"


def test_alias_watch_loop_refreshes(make_server, echo_engine_cls):
    engine = echo_engine_cls()
    make_server(lambda config, observer: engine, alias_refresh=0.05)
    assert engine.refreshed.wait(30)


def test_request_log_is_structured_json(echo_server, caplog):
    from adapterctl.server.logs import JsonFormatter

    caplog.set_level(logging.INFO, logger="adapterctl.server.requests")
    bg = echo_server()
    with Client(bg.address, timeout=10) as c:
        c.generate("hello", adapter="echo-x", request_id="rid-1", max_new_tokens=3)
    record = next(r for r in caplog.records if getattr(r, "request_id", None) == "rid-1")
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "generate OK" and line["status"] == "OK" and line["adapter"] == "echo-x"
    assert line["version"] == 1 and line["prompt_tokens"] == 5 and line["completion_tokens"] == 3
    assert line["latency_ms"] >= 0 and line["level"] == "INFO" and line["ts"].endswith("Z")
