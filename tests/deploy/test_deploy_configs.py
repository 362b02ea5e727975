"""deploy/: Prometheus config, rules and rule unit tests pass promtool; the compose file
only sets real serve options and runs the shared nginx config. (Routing through nginx:
test_scale_out.py; Kubernetes: test_k8s.py; Grafana: test_grafana.py.)"""
from __future__ import annotations

import re
import shutil
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


def test_compose_sets_only_real_options(serve_settings):
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"minio", "minio-init", "adapterctl-1", "adapterctl-2", "nginx", "prometheus", "grafana"} <= set(services)
    for name in ("adapterctl-1", "adapterctl-2"):
        config = serve_settings([], {k: str(v) for k, v in services[name]["environment"].items()})
        assert int(services[name]["stop_grace_period"].rstrip("s")) > config.shutdown_grace
        assert config.registry.uri.startswith("s3://")
    targets = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())["scrape_configs"][0]
    assert targets["static_configs"][0]["targets"] == ["adapterctl-1:9400", "adapterctl-2:9400"]
    # nginx runs the shared nginx.conf, whose upstreams.conf lists exactly these replicas
    nginx = services["nginx"]
    source, mount = nginx["volumes"][0].split(":")[:2]
    assert DEPLOY / source == DEPLOY / "nginx" and nginx["command"][:3] == ["nginx", "-c", f"{mount}/nginx.conf"]
    upstreams = re.findall(r"^server (\S+) ", (DEPLOY / "nginx/upstreams.conf").read_text(), re.M)
    assert upstreams == ["adapterctl-1:50051", "adapterctl-2:50051"]
    http_ports = {serve_settings([], {k: str(v) for k, v in services[n]["environment"].items()}).http_port
                  for n in ("adapterctl-1", "adapterctl-2")}
    http_upstreams = re.findall(r"^server (\S+) ", (DEPLOY / "nginx/upstreams-http.conf").read_text(), re.M)
    assert http_upstreams == [f"adapterctl-{i}:{port}" for i in (1, 2) for port in http_ports]
    assert "8000:8000" in nginx["ports"] and "8080:8080" in nginx["ports"]
