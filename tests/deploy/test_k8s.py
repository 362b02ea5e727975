"""deploy/k8s: each overlay renders with ``kubectl kustomize`` and validates offline against
the Kubernetes schemas (kubernetes-validate); the server's flags and settings are real
``adapterctl serve`` options; probes, grace period, PDB, routing and GPU resources hold."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBECTL = shutil.which("kubectl")
KUBERNETES_VERSION = "1.30"  # oldest release the manifests target (native gRPC probes are GA since 1.27)
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize v5) not installed: "
                                                        "the manifests cannot be rendered here")
IMAGES = {"cpu": "deploy/Dockerfile", "gpu": "deploy/Dockerfile.gpu"}  # the image each overlay runs


def entrypoint_args(overlay_name: str) -> list[str]:
    """The words after ``adapterctl serve`` in the ENTRYPOINT of the overlay's Dockerfile."""
    import dockerfile

    parsed = dockerfile.parse_file(str(DEPLOY.parent / IMAGES[overlay_name]))
    words = list(next(i for i in parsed if i.cmd == "ENTRYPOINT").value)
    assert words[:2] == ["adapterctl", "serve"], words
    return words[2:]


def render(path: Path) -> list[dict]:
    proc = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(DEPLOY / "k8s/overlays" / request.param)


def one(docs: list[dict], kind: str, name: str) -> dict:
    """The ``kind`` named ``name`` (generated ConfigMaps carry a content-hash suffix)."""
    found = [d for d in docs if d["kind"] == kind and re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?",
                                                                   d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in docs if d["kind"] == kind])
    return found[0]


def server_container(docs: list[dict]) -> dict:
    return one(docs, "StatefulSet", "adapterctl")["spec"]["template"]["spec"]["containers"][0]


def test_overlays_validate_against_the_schemas(overlay):
    import kubernetes_validate

    name, docs = overlay
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret"} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any schema error


def test_schema_validation_catches_a_broken_manifest(overlay):
    import kubernetes_validate

    _, docs = overlay
    broken = yaml.safe_load(yaml.safe_dump(one(docs, "StatefulSet", "adapterctl")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"  # must be int
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_server_flags_and_settings_are_real_serve_options(overlay, serve_settings):
    name, docs = overlay
    container = server_container(docs)
    config_map = one(docs, "ConfigMap", "adapterctl-config")
    assert [e["configMapRef"]["name"] for e in container["envFrom"]] == [config_map["metadata"]["name"]]
    config = serve_settings(entrypoint_args(name) + container["args"], config_map["data"])
    assert (config.port, config.metrics_port, config.host) == (50051, 9400, "0.0.0.0")
    assert config.registry.uri.startswith("s3://")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.http_enabled and config.http_port == 8000
    assert ports == {"grpc": config.port, "http": config.http_port, "metrics": config.metrics_port}
    pod = one(docs, "StatefulSet", "adapterctl")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.shutdown_grace  # the drain ends before SIGKILL
    # the auth token file and S3 credentials come from the Secret
    secret = one(docs, "Secret", "adapterctl-secrets")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "secrets")
    volume = next(v for v in pod["volumes"] if v["name"] == "secrets")["secret"]
    assert volume["secretName"] == secret["metadata"]["name"]
    assert str(config.auth_token_file) == f"{mount['mountPath']}/{volume['items'][0]['path']}"
    assert volume["items"][0]["key"] in secret["stringData"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert {ref["name"] for ref in env.values()} == {secret["metadata"]["name"]}
    assert set(env) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    if name == "gpu":
        assert (config.engine.dtype, config.engine.device) == ("bfloat16", "cuda")
    else:
        assert config.engine.dtype == "auto" and config.engine.device is None


def test_flag_check_rejects_unknown_flags_and_values(overlay, serve_settings):
    import click

    from adapterctl.errors import InvalidArgument

    with pytest.raises(click.NoSuchOption):
        serve_settings(["--dtype-typo", "bfloat16"], {})
    with pytest.raises(click.BadParameter):
        serve_settings(["--dtype", "int4"], {})
    with pytest.raises(AssertionError, match="ADAPTERCTL_NO_SUCH"):
        serve_settings([], {"ADAPTERCTL_NO_SUCH": "1"})
    with pytest.raises(InvalidArgument):
        serve_settings([], {"ADAPTERCTL_MAX_ADAPTERS": "0"})


def test_grpc_probes_and_resources(overlay):
    name, docs = overlay
    container = server_container(docs)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051, probe  # grpc.health.v1 on the serving port
    assert container["readinessProbe"]["grpc"]["service"] == "adapterctl.v1.Inference"
    liveness = container["livenessProbe"]
    pod = one(docs, "StatefulSet", "adapterctl")["spec"]["template"]["spec"]
    # a draining replica answers NOT_SERVING: liveness must not restart it before the drain ends
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > pod["terminationGracePeriodSeconds"]
    resources = container["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"]  # no overcommit of model memory
    assert "cpu" in resources["requests"]
    gpus = resources["limits"].get("nvidia.com/gpu")
    assert (gpus == 1) if name == "gpu" else (gpus is None)
    image = container["image"]
    assert image.endswith("-cuda" if name == "gpu" else "-cpu"), image


def test_pdbs_select_their_pods(overlay):
    _, docs = overlay
    for workload_kind, name in (("StatefulSet", "adapterctl"), ("Deployment", "adapterctl-router")):
        workload = one(docs, workload_kind, name)
        pdb = one(docs, "PodDisruptionBudget", name)
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pdb["spec"]["maxUnavailable"] == 1 and workload["spec"]["replicas"] >= 2


def test_router_runs_the_shared_nginx_config_over_every_replica(overlay):
    _, docs = overlay
    nginx_cm = one(docs, "ConfigMap", "adapterctl-nginx")
    assert nginx_cm["data"]["nginx.conf"] == (DEPLOY / "nginx/nginx.conf").read_text()  # one source of truth
    router = one(docs, "Deployment", "adapterctl-router")["spec"]["template"]["spec"]
    volume = next(v for v in router["volumes"] if v["configMap"]["name"] == nginx_cm["metadata"]["name"])
    mount = next(m for m in router["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    command = router["containers"][0]["command"]
    assert command[command.index("-c") + 1] == f"{mount['mountPath']}/nginx.conf"
    # one upstream per StatefulSet pod, each through a ClusterIP Service selecting that pod by name
    statefulset = one(docs, "StatefulSet", "adapterctl")
    pods = [f"adapterctl-{i}" for i in range(statefulset["spec"]["replicas"])]
    upstreams = re.findall(r"^server (\S+):50051 ", nginx_cm["data"]["upstreams.conf"], re.M)
    assert upstreams == pods
    http_upstreams = re.findall(r"^server (\S+):8000 ", nginx_cm["data"]["upstreams-http.conf"], re.M)
    assert http_upstreams == pods  # the HTTP API's ring: the same replicas, on their http port
    server_ports = {p["name"]: p["containerPort"] for p in server_container(docs)["ports"]}
    for pod in pods:
        service = one(docs, "Service", pod)
        assert service["spec"]["selector"] == {"statefulset.kubernetes.io/pod-name": pod}
        ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
        assert ports == {"grpc": (50051, "grpc"), "http": (8000, "http")}
        assert {"grpc", "http"} <= server_ports.keys()
    router_svc = one(docs, "Service", "adapterctl-router")
    router_pod = one(docs, "Deployment", "adapterctl-router")["spec"]["template"]
    assert router_svc["spec"]["selector"].items() <= router_pod["metadata"]["labels"].items()
    # the front door has both of nginx.conf's listeners: gRPC 8080, HTTP 8000
    listens = sorted(int(port) for port in re.findall(r"^\s*listen (\d+)", nginx_cm["data"]["nginx.conf"], re.M))
    router_ports = {p["name"]: p["containerPort"] for p in router_pod["spec"]["containers"][0]["ports"]}
    assert sorted(router_ports.values()) == listens == [8000, 8080]
    assert {(p["port"], p["targetPort"]) for p in router_svc["spec"]["ports"]} == \
        {(port, name) for name, port in router_ports.items()}


def test_statefulset_keeps_the_home_volume(overlay):
    _, docs = overlay
    statefulset = one(docs, "StatefulSet", "adapterctl")
    claims = [c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]]
    mounts = {m["name"]: m["mountPath"] for m in server_container(docs)["volumeMounts"]}
    assert claims == ["home"] and mounts["home"] == "/var/lib/adapterctl"  # ADAPTERCTL_HOME of the images
    assert statefulset["spec"]["serviceName"] == one(docs, "Service", "adapterctl")["metadata"]["name"]


def test_grafana_dashboard_configmap_renders():
    docs = render(DEPLOY / "grafana")
    assert [d["kind"] for d in docs] == ["ConfigMap"]
    assert docs[0]["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert docs[0]["data"]["adapterctl.json"] == (DEPLOY / "grafana/adapterctl.json").read_text()
