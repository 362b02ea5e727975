"""deploy/: Prometheus config, rules and rule unit tests pass promtool; the compose file
only sets real serve options; nginx hashes each adapter onto one replica."""
from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus')")


@needs_promtool
@pytest.mark.parametrize("args", [["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"],
                                  ["test", "rules", "rules_test.yml"], ["check", "rules", "canary_rules.yml"],
                                  ["test", "rules", "canary_rules_test.yml"]])
def test_promtool(args):
    proc = subprocess.run([PROMTOOL, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_sets_only_real_options():
    from adapterctl.server.config import ServerConfig

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"minio", "minio-init", "adapterctl-1", "adapterctl-2", "nginx", "prometheus"} <= set(services)
    known = {"ADAPTERCTL_" + f.name.upper() for f in dataclasses.fields(ServerConfig)}
    for name in ("adapterctl-1", "adapterctl-2"):
        env = services[name]["environment"]
        assert {k for k in env if k.startswith("ADAPTERCTL_")} <= known
        grace = float(env["ADAPTERCTL_SHUTDOWN_GRACE"])
        assert int(services[name]["stop_grace_period"].rstrip("s")) > grace
        assert env["ADAPTERCTL_REGISTRY"].startswith("s3://")
    targets = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())["scrape_configs"][0]
    assert targets["static_configs"][0]["targets"] == ["adapterctl-1:9400", "adapterctl-2:9400"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _echo_fixtures():
    spec = importlib.util.spec_from_file_location("_grpc_fixtures", DEPLOY.parent / "tests/server/grpc/conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
def test_nginx_routes_each_adapter_to_one_replica(tmp_path):
    from adapterctl.client import Client
    from adapterctl.errors import PermissionDenied

    fixtures = _echo_fixtures()
    replicas = [fixtures.start_server(tmp_path / f"r{i}", lambda c, o: fixtures.EchoEngine()) for i in range(2)]
    proxy_port = _free_port()
    conf = (DEPLOY / "nginx/nginx.conf").read_text()
    conf = conf.replace("adapterctl-1:50051", replicas[0].address).replace("adapterctl-2:50051", replicas[1].address)
    conf = conf.replace("listen 8080", f"listen 127.0.0.1:{proxy_port}").replace("/tmp/", f"{tmp_path}/")
    (tmp_path / "nginx.conf").write_text(conf)
    nginx = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        names = [f"echo-{i}" for i in range(16)]
        with Client(f"127.0.0.1:{proxy_port}", timeout=20) as client:
            client.wait_ready(timeout=30)
            for _ in range(3):
                for name in names:
                    assert client.generate("hi", adapter=name).adapter.name == name
            with pytest.raises(PermissionDenied):
                client.list_adapters()
        counts = [_requests_by_adapter(r.server.metrics_port) for r in replicas]
        for name in names:
            assert sorted(c.get(name, 0) for c in counts) == [0, 3], (name, counts)  # all 3 on one replica
        served = [len(c) for c in counts]
        assert all(n > 0 for n in served), f"one replica got every adapter: {served}"
    finally:
        nginx.terminate()
        nginx.wait(30)
        for r in replicas:
            r.stop()


def _requests_by_adapter(port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {s.labels["adapter"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "adapterctl_requests_total"}
