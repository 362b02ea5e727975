"""Per-alias-version metrics: labels, bounded cardinality (aliases per adapter, versions
per alias), and an exposition promtool accepts."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adapterctl.server.metrics import MAX_ALIASES_PER_ADAPTER, MAX_VERSIONS_PER_ALIAS, ServerMetrics


def samples(metrics: ServerMetrics, name: str) -> dict[tuple, float]:
    text = generate_latest(metrics.registry).decode()
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def test_alias_series_carry_version_role_and_code():
    m = ServerMetrics()
    m.observe_alias_request("chat", "prod", 3, "primary", "OK", 0.2, 0.05)
    m.observe_alias_request("chat", "prod", 4, "canary", "INTERNAL", 0.1, None)
    m.observe_alias_request("chat", "prod", 4, "canary", "OK", 0.3, 0.07)
    got = samples(m, "adapterctl_alias_requests_total")
    assert got == {
        (("adapter", "chat"), ("alias", "prod"), ("code", "OK"), ("role", "primary"), ("version", "3")): 1,
        (("adapter", "chat"), ("alias", "prod"), ("code", "INTERNAL"), ("role", "canary"), ("version", "4")): 1,
        (("adapter", "chat"), ("alias", "prod"), ("code", "OK"), ("role", "canary"), ("version", "4")): 1,
    }
    ttft = samples(m, "adapterctl_alias_time_to_first_token_seconds_count")
    assert ttft[(("adapter", "chat"), ("alias", "prod"), ("role", "canary"), ("version", "4"))] == 1
    latency = samples(m, "adapterctl_alias_request_duration_seconds_count")
    assert latency[(("adapter", "chat"), ("alias", "prod"), ("role", "canary"), ("version", "4"))] == 2


def test_alias_series_are_bounded():
    m = ServerMetrics(max_adapters=2)
    for version in range(1, 10):  # a long series of promotions
        m.observe_alias_request("chat", "prod", version, "primary", "OK", 0.1, 0.01)
        m.observe_alias_request("chat", "prod", version, "primary", "UNAVAILABLE", 0.1, None)
    for i in range(MAX_ALIASES_PER_ADAPTER + 3):
        m.observe_alias_request("chat", f"a{i}", 1, "primary", "OK", 0.1, 0.01)
    for name in ("x", "y", "z"):  # the adapter label cap applies too
        m.observe_alias_request(name, "prod", 1, "primary", "OK", 0.1, 0.01)
    got = samples(m, "adapterctl_alias_requests_total")
    prod_versions = {dict(k)["version"] for k in got if dict(k)["adapter"] == "chat" and dict(k)["alias"] == "prod"}
    assert prod_versions == {str(v) for v in range(10 - MAX_VERSIONS_PER_ALIAS, 10)}
    aliases = {dict(k)["alias"] for k in got if dict(k)["adapter"] == "chat"}
    assert len(aliases) == MAX_ALIASES_PER_ADAPTER + 1 and "__other__" in aliases
    assert {dict(k)["adapter"] for k in got} == {"chat", "x", "__other__"}
    hist = samples(m, "adapterctl_alias_request_duration_seconds_count")
    assert {dict(k)["version"] for k in hist if dict(k)["alias"] == "prod" and dict(k)["adapter"] == "chat"} == \
        prod_versions


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package 'prometheus')")
def test_alias_exposition_passes_promtool():
    m = ServerMetrics()
    m.observe_alias_request("chat", "prod", 4, "canary", "OK", 0.3, 0.07)
    proc = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(m.registry), capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
