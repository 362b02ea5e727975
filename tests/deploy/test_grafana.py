"""deploy/grafana/adapterctl.json cannot drift from the server: every metric a panel or
template variable queries is in the /metrics exposition of a live server (tiny model,
batching engine, after real requests), with the labels the queries filter and group by;
every query is valid PromQL (promtool); compose provisions the dashboard."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = json.loads((DEPLOY / "grafana/adapterctl.json").read_text())
PROMTOOL = shutil.which("promtool")
METRIC = re.compile(r"\b(adapterctl_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b(adapterctl_[a-z0-9_]+)\{([^}]*)\}")
GROUPING = re.compile(r"\bby \(([\w, ]+)\) \((?:rate\()?(adapterctl_[a-z0-9_]+)")
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time, not in the exposition


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return [p for p in out if p["type"] != "row"]


def queries() -> list[str]:
    """Every PromQL string in the dashboard: panel targets and template-variable queries."""
    exprs = [t["expr"] for p in panels(DASHBOARD) for t in p["targets"]]
    exprs += [v["definition"] for v in DASHBOARD["templating"]["list"] if v["type"] == "query"]
    return exprs


@pytest.fixture(scope="module")
def exposition(tmp_path_factory, make_adapter, tiny_base, grpc_fixtures, samples_of) -> dict[str, set[str]]:
    """Sample name -> label names, from a live server after an adapter, a base-model, a
    streamed and a failing request (so per-request series exist)."""
    from adapterctl.client import Client
    from adapterctl.errors import NotFound
    from adapterctl.registry import open_registry

    root = tmp_path_factory.mktemp("grafana")
    uri = f"file://{root / 'registry'}"
    open_registry(uri).publish(make_adapter("grafana-a", seed=5), "reviews")
    server = grpc_fixtures.start_server(root / "server", engine="batched", registry=uri,
                                        base_model=str(tiny_base.path), max_prompt_tokens=40)
    try:
        with Client(server.address, timeout=60) as client:
            client.generate("The movie was", adapter="reviews", max_new_tokens=4)
            client.generate("The movie was", max_new_tokens=4)
            list(client.generate_stream("Hello", adapter="reviews", max_new_tokens=4))
            with pytest.raises(NotFound):
                client.generate("x", adapter="nosuch", max_new_tokens=2)
        samples = samples_of(server.server.metrics_port)
    finally:
        server.stop()
    names: dict[str, set[str]] = {}
    for sample in samples:
        names.setdefault(sample.name, set()).update(sample.labels)
    return names


def test_dashboard_shape():
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert {"replica", "adapter", "datasource"} <= set(variables)
    titles = " | ".join(p["title"] for p in panels(DASHBOARD))
    for wanted in ("Request rate", "Errors by code", "Latency p50 / p95", "Time to first token",
                   "Time per output token", "tokens/s", "Hit ratio per tier", "Evictions", "Load latency",
                   "Resident adapters", "Resident bytes", "Running / waiting", "Batch size", "KV cache",
                   "Queue rejections", "Base model"):
        assert wanted in titles, wanted
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(DASHBOARD):
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for metric, matchers in SELECTOR.findall(target["expr"]):  # the replica variable filters all
                assert 'instance=~"$replica"' in matchers, (panel["title"], metric)


def test_every_queried_metric_and_label_is_exported(exposition):
    used = sorted({m for q in queries() for m in METRIC.findall(q)})
    assert len(used) >= 15
    missing = [m for m in used if m not in exposition]
    assert not missing, f"dashboard queries metrics the server does not export: {missing}"
    for query in queries():
        for metric, matchers in SELECTOR.findall(query):
            labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers)) - TARGET_LABELS
            assert labels <= exposition[metric], (metric, labels - exposition[metric], query)
            if "adapter" in exposition[metric] and not query.startswith("label_values("):
                assert 'adapter=~"$adapter"' in matchers, (metric, query)  # the adapter variable filters it
        for by, metric in GROUPING.findall(query):
            labels = {label.strip() for label in by.split(",")} - TARGET_LABELS - {"le"}
            assert labels <= exposition[metric], (metric, labels - exposition[metric], query)


def test_check_catches_a_metric_the_server_lacks(exposition):
    assert "adapterctl_requests_total" in exposition and "adapterctl_request_total" not in exposition


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus')")
def test_every_query_is_valid_promql(tmp_path):
    concrete = {"$replica": ".+", "$adapter": ".+", "$__rate_interval": "1m"}

    def substitute(expr: str) -> str:
        for var, value in concrete.items():
            expr = expr.replace(var, value)
        return expr

    rules = [{"record": f"dashboard:query{i}", "expr": substitute(q)} for i, q in enumerate(queries())
             if not q.startswith("label_values(")]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(rules)} rules found" in proc.stdout


def test_compose_provisions_grafana_with_the_dashboard():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = {m.split(":")[1]: DEPLOY / m.split(":")[0] for m in grafana["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards/adapterctl.yml").read_text())["providers"][0]
    dashboards_dir = provider["options"]["path"]
    dashboard_files = [src for dst, src in mounts.items() if dst.startswith(dashboards_dir + "/")]
    assert dashboard_files == [DEPLOY / "grafana/adapterctl.json"]
