"""``ServerConfig``: the settings of one ``adapterctl serve`` process, as a tree.

The server's own settings (listening, security, logging) are declared here; the registry's
(:class:`~adapterctl.registry.RegistryConfig`), the adapter store's
(:class:`~adapterctl.server.cache.store.AdapterStoreConfig`) and the engine's
(:class:`~adapterctl.server.engine.config.EngineConfig`) are nested, each declared once in
its component. Every leaf is a ``serve`` option of the same name (``--max-lora-rank``) that
also reads ``ADAPTERCTL_<NAME>`` (via :func:`adapterctl.options.click_options`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterctl.errors import InvalidArgument
from adapterctl.options import nested, option
from adapterctl.registry.uri import RegistryConfig
from adapterctl.server.cache.config import AdapterStoreConfig
from adapterctl.server.engine.config import EngineConfig

# ``click_options(ServerConfig, **CLI_SETTINGS)``: every option also reads ADAPTERCTL_<FIELD>
# (the serve help says so once, so the per-option help does not repeat it).
CLI_SETTINGS: dict[str, Any] = {"envvar_prefix": "ADAPTERCTL_", "show_envvar": False}


@dataclass
class ServerConfig:
    """Settings of one server process: gRPC and metrics endpoints, security, logging, and the
    nested registry, adapter-store and engine configs."""

    registry: RegistryConfig = nested(RegistryConfig, "Where adapters are published.")
    base_model: str | None = option(None, "Base model: gemma-3-270m (default), a local directory or an HF model id.",
                                    envvar="ADAPTERCTL_BASE_MODEL")
    chat_template: Path | None = option(None, "Jinja chat template file overriding the tokenizer's.", path="file")
    host: str = option("127.0.0.1", "Address the gRPC server binds.")
    port: int = option(50051, "gRPC port (0 = pick a free one; see --ready-file).")
    metrics_host: str | None = option(None, "Address of the /metrics endpoint (default: --host).")
    metrics_port: int = option(9400, "Prometheus /metrics port (0 = pick a free one, -1 = off).")
    http_port: int = option(8000, "OpenAI-compatible HTTP API port on --host (0 = pick a free one, -1 = off).")
    http: bool = option(True, "Serve the HTTP API (--no-http turns it off, like --http-port -1).")
    default_max_new_tokens: int = option(128, "max_new_tokens when a request leaves it 0.")
    shutdown_grace: float = option(10.0, "Seconds in-flight requests get to finish after SIGTERM.")
    tls_cert: Path | None = option(None, "PEM server certificate (enables TLS; needs --tls-key).", path="file")
    tls_key: Path | None = option(None, "PEM private key of --tls-cert.", path="file")
    tls_client_ca: Path | None = option(None, "PEM CA bundle; clients must present a cert it signed (mTLS).",
                                        path="file")
    auth_token_file: Path | None = option(None, "Bearer tokens, one 'TOKEN ROLE' per line (role infer|admin); "
                                          "enables auth.", path="file")
    metrics_max_adapters: int = option(50, "Distinct adapter label values in metrics; the rest are __other__.")
    log_json: bool = option(False, "Log one JSON object per line.")
    ready_file: Path | None = option(None, "Write {pid, host, port, metrics_port, http_port} as JSON here once "
                                     "SERVING.", path="out")
    store: AdapterStoreConfig = nested(AdapterStoreConfig, "Host-RAM and disk tiers, alias refresh.")
    engine: EngineConfig = nested(EngineConfig, "The batching engine.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.metadata.get("path") and isinstance(getattr(self, f.name), str):
                setattr(self, f.name, Path(getattr(self, f.name)))
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"--port must be in [0, 65535], got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise InvalidArgument(f"--metrics-port must be in [-1, 65535], got {self.metrics_port}")
        if not -1 <= self.http_port <= 65535:
            raise InvalidArgument(f"--http-port must be in [-1, 65535], got {self.http_port}")
        if self.metrics_max_adapters < 1:
            raise InvalidArgument(f"--metrics-max-adapters must be >= 1, got {self.metrics_max_adapters}")
        if not 1 <= self.default_max_new_tokens <= self.engine.max_new_tokens_limit:
            raise InvalidArgument("--default-max-new-tokens must be in [1, --max-new-tokens-limit]")
        if self.shutdown_grace < 0:
            raise InvalidArgument("--shutdown-grace must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidArgument("--tls-client-ca (mTLS) needs --tls-cert/--tls-key")

    @property
    def http_enabled(self) -> bool:
        return self.http and self.http_port >= 0

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
