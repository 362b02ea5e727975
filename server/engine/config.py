"""The batching engine's configuration: one dataclass whose field metadata (help, envvar)
feeds CLI options and docs; ``__post_init__`` validates every field."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from adapterctl.errors import InvalidArgument

LORA_MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFILL_MODES = ("interleave", "separate", "mixed")


def _opt(default: Any, help: str, envvar: str | None = None, **kw: Any) -> Any:
    meta = {"help": help}
    if envvar:
        meta["envvar"] = envvar
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class EngineConfig:
    """Limits and knobs of :class:`~adapterctl.server.engine.engine.BatchingEngine`."""

    max_lora_rank: int = _opt(64, "Largest LoRA rank a device slot holds; adapters above it are refused.",
                              "ADAPTERCTL_MAX_LORA_RANK")
    num_slots: int = _opt(32, "Device adapter slots (distinct adapters in one batch).", "ADAPTERCTL_NUM_SLOTS")
    max_running_requests: int = _opt(64, "Sequences decoded together (KV rows).", "ADAPTERCTL_MAX_RUNNING_REQUESTS")
    max_batch_tokens: int = _opt(2048, "Tokens per forward step (decode rows + prefill chunk tokens).",
                                 "ADAPTERCTL_MAX_BATCH_TOKENS")
    max_kv_tokens: int = _opt(131072, "KV-cache budget in tokens: sum over running requests of "
                                      "prompt + max_new_tokens must fit.", "ADAPTERCTL_MAX_KV_TOKENS")
    max_queue: int = _opt(256, "Requests waiting for admission; beyond it generate() raises ResourceExhausted.",
                          "ADAPTERCTL_MAX_QUEUE")
    max_new_tokens_limit: int = _opt(1024, "Upper bound a request may ask for in max_new_tokens.",
                                     "ADAPTERCTL_MAX_NEW_TOKENS_LIMIT")
    max_prompt_tokens: int = _opt(2048, "Longest accepted prompt (also capped by the model's positions).",
                                  "ADAPTERCTL_MAX_PROMPT_TOKENS")
    max_bypass: int = _opt(64, "Fairness bound: how many later requests may be admitted ahead of a waiting "
                               "request before the engine frees resources for it (a device slot is drained "
                               "for it, or admission pauses until rows/KV fit), so no adapter starves.",
                           "ADAPTERCTL_MAX_BYPASS")
    prefill_mode: str = _opt("interleave", "'interleave': new prompts are prefilled between the layers of the "
                                           "running decode step (lowest TTFT); 'separate': they get their own step "
                                           "before the next decode step; 'mixed': prompt chunks ride along with "
                                           "the decode step.", "ADAPTERCTL_PREFILL_MODE")
    lora_backend: str = _opt("auto", "LoRA compute: auto | gather | segment.", "ADAPTERCTL_LORA_BACKEND")
    cpu_gemm: str = _opt("auto", "Dense matmul: auto (oneDNN on CPU, measured faster than MKL) | onednn | torch.",
                         "ADAPTERCTL_CPU_GEMM")
    lora_modules: tuple[str, ...] = _opt(LORA_MODULE_TYPES, "Linear layers that accept LoRA.")
    device: str | None = _opt(None, "torch device (default: cuda if available, else cpu).", "ADAPTERCTL_DEVICE")
    dtype: str = _opt("float32", "Model and adapter dtype: float32 | bfloat16 | float16.", "ADAPTERCTL_DTYPE")
    ignore_eos: bool = _opt(False, "Benchmarking: always generate max_new_tokens, ignoring end-of-sequence tokens.")
    idle_poll_s: float = _opt(0.5, "Longest the decode thread sleeps with nothing to do (it is woken on work).")

    def __post_init__(self) -> None:
        positive = ("max_lora_rank", "num_slots", "max_running_requests", "max_batch_tokens", "max_kv_tokens",
                    "max_new_tokens_limit", "max_prompt_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgument(f"EngineConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("max_queue", "max_bypass"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InvalidArgument(f"EngineConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.max_batch_tokens < self.max_running_requests:
            raise InvalidArgument(f"EngineConfig.max_batch_tokens ({self.max_batch_tokens}) must be >= "
                                  f"max_running_requests ({self.max_running_requests}): every running row decodes "
                                  "one token per step")
        if self.prefill_mode not in PREFILL_MODES:
            raise InvalidArgument(f"EngineConfig.prefill_mode must be one of {PREFILL_MODES}, got {self.prefill_mode!r}")
        from adapterctl.server.engine.lora import BACKENDS

        if self.lora_backend not in BACKENDS:
            raise InvalidArgument(f"EngineConfig.lora_backend must be one of {tuple(BACKENDS)}, got {self.lora_backend!r}")
        from adapterctl.server.engine.kernels import GEMMS

        if self.cpu_gemm not in GEMMS:
            raise InvalidArgument(f"EngineConfig.cpu_gemm must be one of {GEMMS}, got {self.cpu_gemm!r}")
        self.lora_modules = tuple(self.lora_modules)
        unknown = sorted(set(self.lora_modules) - set(LORA_MODULE_TYPES))
        if unknown or not self.lora_modules:
            raise InvalidArgument(f"EngineConfig.lora_modules must be a non-empty subset of {LORA_MODULE_TYPES}, "
                                  f"got {self.lora_modules!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidArgument(f"EngineConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not self.idle_poll_s > 0:
            raise InvalidArgument(f"EngineConfig.idle_poll_s must be > 0, got {self.idle_poll_s!r}")

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (for CLI options and docs)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
