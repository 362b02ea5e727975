"""``EngineConfig``: every setting of the batching engine, declared once. ``ServerConfig``
nests it, so each field is also an ``adapterctl serve`` option of the same name
(``--max-lora-rank``, envvar ``ADAPTERCTL_MAX_LORA_RANK``); ``__post_init__`` validates."""
from __future__ import annotations

from dataclasses import dataclass

from adapterctl.errors import InvalidArgument
from adapterctl.options import option

LORA_MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFILL_MODES = ("interleave", "separate", "mixed")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EngineConfig:
    """Limits and knobs of :class:`~adapterctl.server.engine.engine.BatchingEngine`."""

    max_adapters: int = option(8, "Device slots for adapters (LRU): the LoRA memory is max_adapters x "
                               "max_lora_rank rank rows, paged (--lora-page-rank), so this many max-rank adapters "
                               "are resident at once, or more of lower rank.")
    max_lora_rank: int = option(64, "Largest LoRA rank accepted; a slot holds this rank (higher -> "
                                "FAILED_PRECONDITION).")
    lora_page_rank: int = option(8, "Rank rows per page of the device LoRA memory: an adapter of rank r takes "
                                 "ceil(r / page) pages, so a slot's memory holds max_lora_rank / page adapters of "
                                 "rank <= page (>= max_lora_rank: one adapter per slot, whatever its rank).")
    max_running_requests: int = option(64, "Sequences decoded together (KV rows).")
    max_waiting: int = option(64, "Requests allowed to wait for admission; more -> RESOURCE_EXHAUSTED.")
    max_batch_tokens: int = option(2048, "Tokens per forward step (decode rows + prefill chunk tokens).")
    max_kv_tokens: int = option(131072, "KV-cache budget in tokens: the sum over running requests of "
                                "prompt + max_new_tokens must fit.")
    max_new_tokens_limit: int = option(1024, "Largest max_new_tokens a request may ask for.")
    max_prompt_tokens: int = option(2048, "Longest accepted prompt in tokens (also capped by the model's window).")
    max_bypass: int = option(64, "Fairness bound: how many later requests may be admitted ahead of a waiting "
                             "request before the engine frees resources for it (a device slot is drained "
                             "for it, or admission pauses until rows/KV fit), so no adapter starves.")
    prefill_mode: str = option("interleave", "'interleave': new prompts are prefilled between the layers of the "
                               "running decode step (lowest TTFT); 'separate': they get their own step before "
                               "the next decode step; 'mixed': prompt chunks ride along with the decode step.",
                               choices=PREFILL_MODES)
    prefill_merge_until: float = option(0.4, "interleave mode: a prompt arriving while another is prefilled "
                                        "rides along in it if that one has done at most this fraction of its "
                                        "layers (0: never, 1: up to its final norm); later ones wait for their "
                                        "own forward.")
    lora_backend: str = option("auto", "LoRA compute: auto | gather | segment.")
    cpu_gemm: str = option("auto", "Dense matmul on CPU: auto (fp32 with AVX-512F or AVX2: our panel GEMM, each row's "
                           "result independent of the batch; "
                           "else oneDNN, measured faster than MKL; bf16 without "
                           "native bf16: weight blocks upcast to fp32; bf16 with AVX512-BF16, AMX or not: 1-4 rows "
                           "through a C GEMV, which keeps a plain copy of the layer weights) | onednn | torch | "
                           "gemv (as auto, but an error where that GEMV does not load).")
    cpu_prepack: bool = option(True, "oneDNN (fp32, and bf16 where the CPU runs it natively): keep the weights in "
                               "oneDNN's blocked layout, or the fp32 panel GEMM's panels (a copy replacing the "
                               "loaded pages; fp32 10-25 % faster "
                               "GEMMs at 8-64 rows on AVX2, bf16 1.1-2.8x on AMX, measured); bf16 on AMX keeps the "
                               "LM head in amx_head's tile layout instead (1.19x a 32-row step).")
    cpu_greedy_head: bool = option(True, "CPU, fp32 or bf16: greedy rows (no logprobs, no grammar) take their token "
                                   "from an int8 copy of the LM head (AMX tiles, AVX512-VNNI or AVX2), computing only "
                                   "the candidates a rounding bound keeps (the full head's token; +1 byte per head "
                                   "weight of memory, 160 MiB for Gemma 3 270M).")
    cpu_planned_layers: bool = option(True, "CPU, bf16 with a C GEMV (AVX512-BF16: 1-4 rows; AVX2: 1-32) or fp32 with "
                                      "the panel GEMM (AVX-512F or AVX2: 1-64 rows): each Gemma 3 layer of a decode "
                                      "step (base or adapter rows) as one C call (norms, projections, RoPE and K/V as "
                                      "the step's other path computes them; attention, GELU and bf16 LoRA deltas in C, "
                                      "which may differ from ATen's by a bf16 ulp, or in fp32 by a few fp32 ulps).")
    lora_modules: tuple[str, ...] = option(LORA_MODULE_TYPES, "Linear layers that accept LoRA.")
    device: str | None = option(None, "Torch device (default: cuda when available, else cpu).")
    dtype: str = option("auto", "Model, KV and adapter dtype. auto: bfloat16 on CPUs with AVX512-BF16 or AMX and "
                        "on CUDA devices that support bf16, float32 otherwise (the choice is logged).",
                        choices=DTYPES)
    prefix_cache_bytes: int = option(256 << 20, "Prefix cache budget in bytes (0 disables): K/V of full prompt blocks "
                                     "kept after prefill, keyed by adapter digest (or base fingerprint) + a chain "
                                     "hash of the tokens, reused by later prompts with the same prefix; LRU. "
                                     "Default 256 MiB (about 7k tokens of Gemma 3 270M in fp32).")
    prefix_block_tokens: int = option(16, "Tokens per prefix-cache block: only whole blocks are cached and reused.")
    ignore_eos: bool = option(False, "Benchmarking: always generate max_new_tokens, ignoring end-of-sequence tokens.")
    idle_poll_s: float = option(0.5, "Longest the decode thread sleeps with nothing to do (it is woken on work).")
    gc_freeze: bool = option(True, "Once loaded, collect and gc.freeze() the process's objects, so Python's full "
                             "garbage collections skip the model, tokenizer and libraries (each one walked ~400k "
                             "objects for 0.3-0.6 s with the GIL held, stalling decode steps). Process-wide; the last "
                             "engine to stop unfreezes.")

    def __post_init__(self) -> None:
        positive = ("max_adapters", "max_lora_rank", "lora_page_rank", "max_running_requests", "max_batch_tokens",
                    "max_kv_tokens", "max_new_tokens_limit", "max_prompt_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgument(f"EngineConfig.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.prefix_block_tokens, int) or self.prefix_block_tokens < 1:
            raise InvalidArgument(f"EngineConfig.prefix_block_tokens must be an integer >= 1, got "
                                  f"{self.prefix_block_tokens!r}")
        for name in ("max_waiting", "max_bypass", "prefix_cache_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InvalidArgument(f"EngineConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.max_batch_tokens < self.max_running_requests:
            raise InvalidArgument(f"EngineConfig.max_batch_tokens ({self.max_batch_tokens}) must be >= "
                                  f"max_running_requests ({self.max_running_requests}): every running row decodes "
                                  "one token per step")
        if self.prefill_mode not in PREFILL_MODES:
            raise InvalidArgument(
                f"EngineConfig.prefill_mode must be one of {PREFILL_MODES}, got {self.prefill_mode!r}"
            )
        if not 0.0 <= self.prefill_merge_until <= 1.0:
            raise InvalidArgument(f"EngineConfig.prefill_merge_until must be in [0, 1], got {self.prefill_merge_until}")
        from adapterctl.server.engine.lora import BACKENDS

        if self.lora_backend not in BACKENDS:
            raise InvalidArgument(
                f"EngineConfig.lora_backend must be one of {tuple(BACKENDS)}, got {self.lora_backend!r}"
            )
        from adapterctl.server.engine.kernels import GEMMS

        if self.cpu_gemm not in GEMMS:
            raise InvalidArgument(f"EngineConfig.cpu_gemm must be one of {GEMMS}, got {self.cpu_gemm!r}")
        self.lora_modules = tuple(self.lora_modules)
        unknown = sorted(set(self.lora_modules) - set(LORA_MODULE_TYPES))
        if unknown or not self.lora_modules:
            raise InvalidArgument(f"EngineConfig.lora_modules must be a non-empty subset of {LORA_MODULE_TYPES}, "
                                  f"got {self.lora_modules!r}")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"EngineConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not self.idle_poll_s > 0:
            raise InvalidArgument(f"EngineConfig.idle_poll_s must be > 0, got {self.idle_poll_s!r}")
