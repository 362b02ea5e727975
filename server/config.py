"""``ServerConfig``: the one definition of every ``adapterctl serve`` setting.

Each field's metadata feeds the click option (``--field-name``, envvar
``ADAPTERCTL_FIELD_NAME``) and its help text; ``__post_init__`` validates.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adapterctl.errors import InvalidArgument
from adapterctl.server.engine.config import PREFILL_MODES, EngineConfig

ENGINES = ("auto", "batched", "reference")
DTYPES = ("float32", "bfloat16", "float16")
# Module holding the batching engine; "auto" picks it when it is importable.
BATCHED_ENGINE_MODULE = "adapterctl.server.engine.batching"


def _path_types() -> dict[str, Callable[[], Any]]:
    import click

    return {"file": lambda: click.Path(exists=True, dir_okay=False, path_type=Path),
            "dir": lambda: click.Path(file_okay=False, path_type=Path),
            "out": lambda: click.Path(dir_okay=False, path_type=Path)}


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, path: str | None = None,
         envvar: str | None = None) -> Any:
    """A dataclass field carrying its CLI help; ``path`` is "file" (must exist), "dir" or "out"."""
    meta = {"help": help, "choices": choices, "path": path, "envvar": envvar}
    return field(default=default, metadata=meta)


def _engine_opt(name: str, **kw: Any) -> Any:
    """A field mirroring ``EngineConfig.<name>`` (its default and help; "[batched engine]" noted)."""
    default = next(f.default for f in dataclasses.fields(EngineConfig) if f.name == name)
    return _opt(default, "[batched engine] " + EngineConfig.help()[name], **kw)


@dataclass
class ServerConfig:
    """Settings of one server process (gRPC, metrics, engine, security, logging)."""

    registry: str | None = _opt(None, "Registry URI (file://..., a path, or s3://bucket/prefix). "
                                "Default: $ADAPTERCTL_REGISTRY or the local registry under $ADAPTERCTL_HOME.",
                                envvar="ADAPTERCTL_REGISTRY")
    base_model: str | None = _opt(None, "Base model: gemma-3-270m (default), a local directory or an HF model id.",
                                  envvar="ADAPTERCTL_BASE_MODEL")
    chat_template: Path | None = _opt(None, "Jinja chat template file overriding the tokenizer's.", path="file")
    host: str = _opt("127.0.0.1", "Address the gRPC server binds.")
    port: int = _opt(50051, "gRPC port (0 = pick a free one; see --ready-file).")
    metrics_host: str | None = _opt(None, "Address of the /metrics endpoint (default: --host).")
    metrics_port: int = _opt(9400, "Prometheus /metrics port (0 = pick a free one, -1 = off).")
    engine: str = _opt("auto", "Inference engine: batched (continuous batching), reference (PEFT, one "
                       "request at a time) or auto (batched when available).", choices=ENGINES)
    device: str | None = _opt(None, "Torch device (default cuda when available, else cpu).")
    dtype: str = _opt("float32", "Weights dtype.", choices=DTYPES)
    max_adapters: int = _opt(8, "Adapters resident on the device at once (LRU).")
    max_lora_rank: int = _opt(64, "Largest LoRA rank accepted (bigger -> FAILED_PRECONDITION).")
    max_waiting: int = _opt(64, "Requests allowed to wait for the engine; more -> RESOURCE_EXHAUSTED.")
    max_new_tokens_limit: int = _opt(1024, "Largest max_new_tokens a request may ask for.")
    default_max_new_tokens: int = _opt(128, "max_new_tokens when a request leaves it 0.")
    # Batching-engine knobs (same names as EngineConfig; defaults and help come from it).
    max_running_requests: int = _engine_opt("max_running_requests")
    max_batch_tokens: int = _engine_opt("max_batch_tokens")
    max_kv_tokens: int = _engine_opt("max_kv_tokens")
    max_prompt_tokens: int = _opt(next(f.default for f in dataclasses.fields(EngineConfig)
                                       if f.name == "max_prompt_tokens"),
                                  "Longest accepted prompt in tokens (also capped by the model's window).")
    prefill_mode: str = _engine_opt("prefill_mode", choices=PREFILL_MODES)
    lora_backend: str = _engine_opt("lora_backend")
    cache_dir: Path | None = _opt(None, "Disk tier for pulled adapters (default $ADAPTERCTL_HOME/adapters).",
                                  path="dir")
    alias_refresh: float = _opt(30.0, "Hot reload: seconds a resolved NAME / NAME:ALIAS is trusted before "
                                "it is re-resolved, and the period of the background refresh (0 = re-resolve "
                                "on every request). The RefreshAliases RPC refreshes at once.")
    shutdown_grace: float = _opt(10.0, "Seconds in-flight requests get to finish after SIGTERM.")
    tls_cert: Path | None = _opt(None, "PEM server certificate (enables TLS; needs --tls-key).", path="file")
    tls_key: Path | None = _opt(None, "PEM private key of --tls-cert.", path="file")
    tls_client_ca: Path | None = _opt(None, "PEM CA bundle; clients must present a cert it signed (mTLS).",
                                      path="file")
    auth_token_file: Path | None = _opt(None, "Bearer tokens, one 'TOKEN ROLE' per line (role infer|admin); "
                                        "enables auth.", path="file")
    metrics_max_adapters: int = _opt(50, "Distinct adapter label values in metrics; the rest are __other__.")
    log_json: bool = _opt(False, "Log one JSON object per line.")
    ready_file: Path | None = _opt(None, "Write {pid, host, port, metrics_port} as JSON here once SERVING.",
                                   path="out")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.metadata["path"] and isinstance(getattr(self, f.name), str):
                setattr(self, f.name, Path(getattr(self, f.name)))
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"--port must be in [0, 65535], got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise InvalidArgument(f"--metrics-port must be in [-1, 65535], got {self.metrics_port}")
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
    def tls(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def click_options(cls) -> Callable[[Callable], Callable]:
        """Decorator adding one click option per field (``--name``, envvar ``ADAPTERCTL_NAME``)."""
        import click

        path_types = _path_types()

        def decorate(func: Callable) -> Callable:
            for f in reversed(dataclasses.fields(cls)):
                meta = f.metadata
                flag = "--" + f.name.replace("_", "-")
                kwargs: dict[str, Any] = {"help": meta["help"], "default": f.default, "show_default": f.default is not None,
                                          "envvar": meta["envvar"] or "ADAPTERCTL_" + f.name.upper()}
                if isinstance(f.default, bool):
                    kwargs.update(is_flag=True, show_default=False)
                elif meta["choices"]:
                    kwargs["type"] = click.Choice(meta["choices"])
                elif meta["path"]:
                    kwargs["type"] = path_types[meta["path"]]()
                elif isinstance(f.default, (int, float)):
                    kwargs["type"] = type(f.default)
                func = click.option(flag, f.name, **kwargs)(func)
            return func

        return decorate

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "ServerConfig":
        """Build from click's keyword arguments, ignoring keys that are not fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})
