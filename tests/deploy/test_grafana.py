"""deploy/grafana/adapterctl.json cannot drift from the server: every metric a panel or
template variable queries is in the /metrics exposition of a live server (tiny model,
batching engine, after real requests), with the labels the queries filter and group by;
every query is valid PromQL (promtool) and returns series from a real Prometheus scraping
that server; compose provisions the dashboard."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = json.loads((DEPLOY / "grafana/adapterctl.json").read_text())
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
VARIABLES = {"$replica": ".+", "$adapter": ".+", "$__rate_interval": "1m"}  # what Grafana substitutes
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


def substitute(expr: str) -> str:
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def queries() -> list[str]:
    """Every PromQL string in the dashboard: panel targets and template-variable queries."""
    exprs = [t["expr"] for p in panels(DASHBOARD) for t in p["targets"]]
    exprs += [v["definition"] for v in DASHBOARD["templating"]["list"] if v["type"] == "query"]
    return exprs


@pytest.fixture(scope="module")
def live_server(tmp_path_factory, make_adapter, tiny_base, grpc_fixtures):
    """A server (tiny model, batching engine) after an adapter, a base-model, a streamed and
    a failing request, so per-request series exist."""
    from adapterctl.client import Client
    from adapterctl.errors import NotFound
    from adapterctl.registry import open_registry

    root = tmp_path_factory.mktemp("grafana")
    uri = f"file://{root / 'registry'}"
    open_registry(uri).publish(make_adapter("grafana-a", seed=5), "reviews")
    server = grpc_fixtures.start_server(root / "server", uri=uri,
                                        base_model=str(tiny_base.path), max_prompt_tokens=40)
    try:
        with Client(server.address, timeout=60) as client:
            client.generate("The movie was", adapter="reviews", max_new_tokens=4)
            client.generate("The movie was", max_new_tokens=4)
            list(client.generate_stream("Hello", adapter="reviews", max_new_tokens=4))
            with pytest.raises(NotFound):
                client.generate("x", adapter="nosuch", max_new_tokens=2)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def exposition(live_server, samples_of) -> dict[str, set[str]]:
    """Sample name -> label names in the live server's /metrics."""
    names: dict[str, set[str]] = {}
    for sample in samples_of(live_server.server.metrics_port):
        names.setdefault(sample.name, set()).update(sample.labels)
    return names


@pytest.fixture(scope="module")
def prometheus(live_server, tmp_path_factory):
    """A real Prometheus scraping the live server every second; yields query(path, **params)."""
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (Debian package 'prometheus')")
    import socket
    import urllib.parse
    import urllib.request

    root = tmp_path_factory.mktemp("prometheus")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (root / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "adapterctl", "static_configs": [
            {"targets": [f"127.0.0.1:{live_server.server.metrics_port}"]}]}]}))
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={root / 'prometheus.yml'}",
                             f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=(root / "log").open("w"))

    def query(path: str, **params: str) -> list:
        url = f"http://127.0.0.1:{port}/api/v1/{path}?" + urllib.parse.urlencode(params)
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", body
        return body["data"]["result"] if isinstance(body["data"], dict) else body["data"]

    try:
        deadline = time.monotonic() + 120
        while True:  # rate() needs two scrapes of every series in its window
            assert proc.poll() is None, (root / "log").read_text()[-2000:]
            try:
                if query("query", query='count_over_time(up{job="adapterctl"}[1m]) >= 3'):
                    break
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, "Prometheus did not scrape the server 3 times in 120 s"
            time.sleep(0.5)
        yield query
    finally:
        proc.terminate()
        proc.wait(30)


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
    rules = [{"record": f"dashboard:query{i}", "expr": substitute(q)} for i, q in enumerate(queries())
             if not q.startswith("label_values(")]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(rules)} rules found" in proc.stdout


def test_every_panel_query_returns_series_from_a_real_prometheus(prometheus):
    empty = []
    for panel in panels(DASHBOARD):
        for target in panel["targets"]:
            if not prometheus("query", query=substitute(target["expr"])):
                empty.append(f"{panel['title']}: {target['expr']}")
    assert not empty, "panels with no data from a live server:\n" + "\n".join(empty)
    for variable in (v for v in DASHBOARD["templating"]["list"] if v["type"] == "query"):
        selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"]).groups()
        values = prometheus(f"label/{label}/values", **{"match[]": substitute(selector)})
        assert values, variable["name"]
        if variable["name"] == "adapter":
            assert {"reviews", "__base__"} <= set(values)


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
