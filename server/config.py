"""``ServerConfig``: the one definition of every ``adapterctl serve`` setting.

Each field's metadata feeds the click option (``--field-name``, envvar ``ADAPTERCTL_FIELD_NAME``,
via :func:`adapterctl.options.click_options`) and its help text; ``__post_init__`` validates.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterctl.errors import InvalidArgument
from adapterctl.options import option
from adapterctl.server.engine.config import PREFILL_MODES, EngineConfig

ENGINES = ("auto", "batched", "reference")
DTYPES = ("float32", "bfloat16", "float16")
# Module holding the batching engine; "auto" picks it when it is importable.
BATCHED_ENGINE_MODULE = "adapterctl.server.engine.batching"
# ``click_options(ServerConfig, **CLI_SETTINGS)``: every option also reads ADAPTERCTL_<FIELD>
# (the serve help says so once, so the per-option help does not repeat it).
CLI_SETTINGS: dict[str, Any] = {"envvar_prefix": "ADAPTERCTL_", "show_envvar": False}


def _engine_default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(EngineConfig) if f.name == name)


def _engine_opt(name: str, **kw: Any) -> Any:
    """A field mirroring ``EngineConfig.<name>`` (its default and help; "[batched engine]" noted)."""
    return option(_engine_default(name), "[batched engine] " + EngineConfig.help()[name], **kw)


@dataclass
class ServerConfig:
    """Settings of one server process (gRPC, metrics, engine, security, logging)."""

    registry: str | None = option(None, "Registry URI (file://..., a path, or s3://bucket/prefix). "
                                  "Default: $ADAPTERCTL_REGISTRY or the local registry under $ADAPTERCTL_HOME.",
                                  envvar="ADAPTERCTL_REGISTRY")
    base_model: str | None = option(None, "Base model: gemma-3-270m (default), a local directory or an HF model id.",
                                    envvar="ADAPTERCTL_BASE_MODEL")
    chat_template: Path | None = option(None, "Jinja chat template file overriding the tokenizer's.", path="file")
    host: str = option("127.0.0.1", "Address the gRPC server binds.")
    port: int = option(50051, "gRPC port (0 = pick a free one; see --ready-file).")
    metrics_host: str | None = option(None, "Address of the /metrics endpoint (default: --host).")
    metrics_port: int = option(9400, "Prometheus /metrics port (0 = pick a free one, -1 = off).")
    http_port: int = option(8000, "OpenAI-compatible HTTP API port on --host (0 = pick a free one, -1 = off).")
    http: bool = option(True, "Serve the HTTP API (--no-http turns it off, like --http-port -1).")
    engine: str = option("auto", "Inference engine: batched (continuous batching), reference (PEFT, one "
                         "request at a time) or auto (batched when available).", choices=ENGINES)
    device: str | None = option(None, "Torch device (default cuda when available, else cpu).")
    dtype: str = option("float32", "Weights dtype.", choices=DTYPES)
    max_adapters: int = option(8, "Adapters resident on the device at once (LRU).")
    max_lora_rank: int = option(64, "Largest LoRA rank accepted (bigger -> FAILED_PRECONDITION).")
    max_waiting: int = option(64, "Requests allowed to wait for the engine; more -> RESOURCE_EXHAUSTED.")
    max_new_tokens_limit: int = option(1024, "Largest max_new_tokens a request may ask for.")
    default_max_new_tokens: int = option(128, "max_new_tokens when a request leaves it 0.")
    # Batching-engine knobs (same names as EngineConfig; defaults and help come from it).
    max_running_requests: int = _engine_opt("max_running_requests")
    max_batch_tokens: int = _engine_opt("max_batch_tokens")
    max_kv_tokens: int = _engine_opt("max_kv_tokens")
    max_prompt_tokens: int = option(_engine_default("max_prompt_tokens"),
                                    "Longest accepted prompt in tokens (also capped by the model's window).")
    prefill_mode: str = _engine_opt("prefill_mode", choices=PREFILL_MODES)
    lora_backend: str = _engine_opt("lora_backend")
    cache_dir: Path | None = option(None, "Disk tier for pulled adapters (default $ADAPTERCTL_HOME/adapters).",
                                    path="dir")
    alias_refresh: float = option(30.0, "Hot reload: seconds a resolved NAME / NAME:ALIAS is trusted before "
                                  "it is re-resolved, and the period of the background refresh (0 = re-resolve "
                                  "on every request). The RefreshAliases RPC refreshes at once.")
    shutdown_grace: float = option(10.0, "Seconds in-flight requests get to finish after SIGTERM.")
    tls_cert: Path | None = option(None, "PEM server certificate (enables TLS; needs --tls-key).", path="file")
    tls_key: Path | None = option(None, "PEM private key of --tls-cert.", path="file")
    tls_client_ca: Path | None = option(None, "PEM CA bundle; clients must present a cert it signed (mTLS).",
                                        path="file")
    auth_token_file: Path | None = option(None, "Bearer tokens, one 'TOKEN ROLE' per line (role infer|admin); "
                                          "enables auth.", path="file")
    metrics_max_adapters: int = option(50, "Distinct adapter label values in metrics; the rest are __other__.")
    log_json: bool = option(False, "Log one JSON object per line.")
    ready_file: Path | None = option(None, "Write {pid, host, port, metrics_port, http_port} as JSON here once SERVING.",
                                     path="out")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.metadata["path"] and isinstance(getattr(self, f.name), str):
                setattr(self, f.name, Path(getattr(self, f.name)))
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"--port must be in [0, 65535], got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise InvalidArgument(f"--metrics-port must be in [-1, 65535], got {self.metrics_port}")
        if not -1 <= self.http_port <= 65535:
            raise InvalidArgument(f"--http-port must be in [-1, 65535], got {self.http_port}")
        for name in ("max_adapters", "max_lora_rank", "max_new_tokens_limit", "metrics_max_adapters",
                     "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise InvalidArgument(f"--max-waiting must be >= 0, got {self.max_waiting}")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise InvalidArgument("--default-max-new-tokens must be in [1, --max-new-tokens-limit]")
        if self.alias_refresh < 0 or self.shutdown_grace < 0:
            raise InvalidArgument("--alias-refresh and --shutdown-grace must be >= 0")
        if self.engine not in ENGINES:
            raise InvalidArgument(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidArgument("--tls-client-ca (mTLS) needs --tls-cert/--tls-key")

    @property
    def resolved_engine(self) -> str:
        """"batched" or "reference": what ``auto`` means on this install."""
        if self.engine != "auto":
            return self.engine
        return "batched" if importlib.util.find_spec(BATCHED_ENGINE_MODULE) else "reference"

    @property
    def http_enabled(self) -> bool:
        return self.http and self.http_port >= 0

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
