"""Unit tests without a server: ServerConfig (validation, CLI options, env vars), the
streaming detokeniser with stop sequences, and the metrics label cap."""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from adapterctl.errors import InvalidArgument
from adapterctl.options import click_options, from_kwargs
from adapterctl.server.config import CLI_SETTINGS, ServerConfig
from adapterctl.server.metrics import AdapterLabels
from adapterctl.server.textstream import StopTextStream


@pytest.mark.parametrize("kwargs", [
    {"port": 70000}, {"metrics_port": -2}, {"max_adapters": 0}, {"max_waiting": -1}, {"dtype": "int3"},
    {"default_max_new_tokens": 2000}, {"tls_cert": "c.pem"}, {"tls_client_ca": "ca.pem"}, {"shutdown_grace": -1},
    {"alias_refresh": -1}, {"host_max_bytes": -5},
])
def test_config_validation(kwargs):
    """Flat settings reach the component that declares them, and it refuses bad values."""
    with pytest.raises(InvalidArgument):
        from_kwargs(ServerConfig, kwargs)


def test_config_tree_declares_each_setting_once():
    """Every serve option is one leaf of the tree, under one name, in one component."""
    from adapterctl.options import leaf_fields

    names = [f.name for f, _ in leaf_fields(ServerConfig)]
    assert len(names) == len(set(names))
    config = from_kwargs(ServerConfig, {"max_lora_rank": 16, "cache_dir": "/tmp/x", "uri": "s3://b/p"})
    assert config.engine.max_lora_rank == 16 and str(config.store.cache_dir) == "/tmp/x"
    assert config.registry.uri == "s3://b/p"


def test_config_options_and_env(monkeypatch, tmp_path):
    seen = {}

    @click.command()
    @click_options(ServerConfig, **CLI_SETTINGS)
    def cmd(**options):
        seen["config"] = from_kwargs(ServerConfig, options)

    monkeypatch.setenv("ADAPTERCTL_METRICS_MAX_ADAPTERS", "7")
    monkeypatch.setenv("ADAPTERCTL_REGISTRY", "s3://b/p")
    monkeypatch.setenv("ADAPTERCTL_MAX_RUNNING_REQUESTS", "5")
    result = CliRunner().invoke(cmd, ["--port", "0", "--max-adapters", "3", "--log-json",
                                      "--ready-file", str(tmp_path / "r.json"), "--host-max-bytes", "1000"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.port, config.log_json, config.metrics_max_adapters) == (0, True, 7)
    assert (config.engine.max_adapters, config.engine.max_running_requests, config.store.host_max_bytes) == (3, 5, 1000)
    assert config.registry.uri == "s3://b/p" and config.ready_file == tmp_path / "r.json"


class _CharTok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _stream(text: str, stop: tuple[str, ...]) -> tuple[list[str], StopTextStream]:
    s = StopTextStream(_CharTok(), stop)
    deltas = [s.push([ord(c)]) for c in text]
    deltas.append(s.finish())
    return deltas, s


def test_stop_sequence_is_cut_and_never_streamed():
    deltas, s = _stream("hello END world", ("END",))
    assert s.stopped and s.text == "hello " and "".join(deltas) == "hello "
    assert all("E" not in d for d in deltas)


def test_partial_stop_prefix_is_held_then_released():
    deltas, s = _stream("an ENigma", ("END",))
    assert not s.stopped and "".join(deltas) == "an ENigma"
    assert deltas[4] == ""  # "E" held back: it might start "END"


def test_incomplete_character_is_held_back():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    s = StopTextStream(Bytes())
    euro = "€".encode()
    assert s.push([euro[0]]) == "" and s.push([euro[1]]) == "" and s.push([euro[2]]) == "€"


def test_label_cap_keeps_first_successful_names():
    labels = AdapterLabels(2)
    assert labels.label(None) == "__base__"
    assert labels.label("junk", claim=False) == "__other__"
    assert [labels.label(n) for n in ("a", "b", "c", "a")] == ["a", "b", "__other__", "a"]


def test_readme_section_lists_only_real_metrics():
    import re
    from pathlib import Path

    from prometheus_client import generate_latest

    from adapterctl.server.metrics import ServerMetrics

    m = ServerMetrics(2)
    m.observe_request("a", "OK", 3, 4, 1.0, 0.1)
    m.observe_alias_request("a", "prod", 2, "canary", "OK", 1.0, 0.1)
    m.on_step(1, 1, 1, 0, 0.5)
    m.on_load("disk", 0.1, "a")
    m.on_residency("device", 1, 10, 0)
    m.on_queue_rejected()
    m.on_prefix_cache(16, 20, 8192)
    assert m.prefix_tokens.labels(result="hit")._value.get() == 16
    assert m.prefix_tokens.labels(result="miss")._value.get() == 4
    m.auth_failures.labels(code="UNAUTHENTICATED").inc()
    m.set_base_model("b", "sha256:x", "cpu", "float32", "PeftEngine")
    from prometheus_client.parser import text_string_to_metric_families

    suffix = {"counter": "_total", "info": "_info"}
    exposed = {f.name + suffix.get(f.type, "")
               for f in text_string_to_metric_families(generate_latest(m.registry).decode())
               if not f.name.endswith("_created")}
    text = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    documented = set(re.findall(r"`(adapterctl_\w+)`", text))
    assert documented == exposed, (documented - exposed, exposed - documented)
