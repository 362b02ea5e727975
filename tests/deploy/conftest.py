"""Fixtures for the deploy/ tests: the gRPC tests' tiny-adapter fixtures, a checker that
parses a container's command line and environment with the real ``adapterctl serve``
options, loopback ports, /metrics scraping and a real nginx running deploy/nginx."""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def _grpc_fixtures():
    spec = importlib.util.spec_from_file_location("_grpc_fixtures", ROOT / "tests/server/grpc/conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GRPC_FIXTURES = _grpc_fixtures()
tiny_hf = GRPC_FIXTURES.tiny_hf  # noqa: F811  (re-exported pytest fixtures)
make_adapter = GRPC_FIXTURES.make_adapter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_samples(port: int) -> list[Any]:
    """Every sample of the /metrics exposition on 127.0.0.1:port (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def requests_by_adapter(port: int, code: str = "OK", api: str = "grpc") -> dict[str, float]:
    """``adapterctl_requests_total`` per adapter label (status ``code``, ``api`` grpc/http) from /metrics."""
    return {s.labels["adapter"]: s.value for s in metric_samples(port)
            if s.name == "adapterctl_requests_total" and s.labels["code"] == code and s.labels["api"] == api}


@pytest.fixture(scope="session")
def grpc_fixtures():
    """tests/server/grpc/conftest.py as a module (start_server, EchoEngine, ...)."""
    return GRPC_FIXTURES


@pytest.fixture(scope="session")
def samples_of() -> Callable[[int], list[Any]]:
    return metric_samples


@pytest.fixture(scope="session")
def serve_settings() -> Callable[[list[str], dict[str, str]], Any]:
    """``check(argv, env) -> ServerConfig``: ``argv`` (the words after ``adapterctl serve``)
    parsed by the real click command (an unknown flag raises NoSuchOption), each value and
    every ADAPTERCTL_* variable of ``env`` converted by its option's type, then validated
    by ``ServerConfig``. File options are not checked for existence (they are container paths)."""
    import click

    from adapterctl.client.cli.serve_cmd import COMMANDS
    from adapterctl.options import from_kwargs
    from adapterctl.server.config import ServerConfig

    command = next(c for c in COMMANDS if c.name == "serve")
    ctx = click.Context(command)
    by_envvar = {p.envvar: p for p in command.params if isinstance(p, click.Option)}

    def convert(param: click.Parameter, value: Any) -> Any:
        if isinstance(param.type, click.Path):
            return Path(value)
        return param.type_cast_value(ctx, value)

    def check(argv: list[str], env: dict[str, str]) -> Any:
        opts, extra, order = command.make_parser(ctx).parse_args(list(argv))
        assert not extra, f"not serve options: {extra}"
        values = {p.name: convert(p, opts[p.name]) for p in order}
        for key, raw in env.items():
            if key.startswith("ADAPTERCTL_"):
                assert key in by_envvar, f"{key} is not an adapterctl serve setting"
                values.setdefault(by_envvar[key].name, convert(by_envvar[key], raw))  # the flag wins
        return from_kwargs(ServerConfig, values)

    return check


class Nginx:
    """deploy/nginx/nginx.conf run by the real nginx on 127.0.0.1, with an upstreams.conf
    listing loopback replicas' gRPC addresses and an upstreams-http.conf their HTTP ones
    (the only per-deployment part of the config)."""

    def __init__(self, workdir: Path, replicas: list[str], http_replicas: list[str]) -> None:
        self.workdir, self.port, self.http_port = workdir, free_port(), free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        conf = (DEPLOY / "nginx/nginx.conf").read_text()
        assert "listen 8080" in conf and "include upstreams.conf;" in conf
        assert "listen 8000;" in conf and "include upstreams-http.conf;" in conf
        conf = conf.replace("listen 8080", f"listen 127.0.0.1:{self.port}").replace("/tmp/", f"{workdir}/")
        conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{self.http_port};")
        (workdir / "nginx.conf").write_text(conf)
        for name, addresses in (("upstreams.conf", replicas), ("upstreams-http.conf", http_replicas)):
            (workdir / name).write_text("".join(f"server {a} max_fails=3 fail_timeout=10s;\n" for a in addresses))
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def stop(self) -> str:
        """Stop nginx; returns its error log."""
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        return err


@pytest.fixture(scope="session")
def nginx_installed() -> None:
    if NGINX is None:
        pytest.skip("nginx not installed (make sysdeps: Debian nginx-light)")


@pytest.fixture(scope="session")
def ok_requests() -> Callable[[int], dict[str, float]]:
    """``ok_requests(metrics_port) -> {adapter label: OK requests}``."""
    return requests_by_adapter


@pytest.fixture
def run_nginx(tmp_path, nginx_installed) -> Iterator[Callable[..., Nginx]]:
    """``run_nginx([grpc address, ...], [http address, ...]) -> Nginx`` (stopped after the test)."""
    started: list[Nginx] = []

    def run(replicas: list[str], http_replicas: list[str]) -> Nginx:
        started.append(Nginx(tmp_path / f"nginx{len(started)}", replicas, http_replicas))
        return started[-1]

    yield run
    for proxy in started:
        if proxy.proc.poll() is None:
            proxy.stop()
