"""TrainConfig: the one definition of every training option, its help text and its validation.

The CLI options (:mod:`adapterctl.client.cli.train_cmd`) and the config-file loader
are generated from the dataclass fields, so an option is written down exactly once.
Precedence: dataclass defaults < config file (YAML/TOML) < CLI flags.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterctl.errors import InvalidArgument
from adapterctl.options import from_kwargs, option

FORMATS = ("auto", "text", "prompt_completion", "messages")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
DEFAULT_EPOCHS = 3.0
# Pairs where setting one in a higher-precedence source clears the other from lower ones.
_EXCLUSIVE = {"epochs": "max_steps", "max_steps": "epochs", "eval_data": "eval_split", "eval_split": "eval_data"}


@dataclass
class TrainConfig:
    """Resolved options of one training run. Paths are kept as given (strings) so the
    config serialises to JSON unchanged; ``__post_init__`` normalises and validates."""

    # --- data
    data: str = option(
        "", "Training data, JSONL: {text} | {prompt, completion} | {messages: [{role, content}]}.", group="data"
    )
    output: str = option(
        "",
        "Output directory: a PEFT adapter (adapter_config.json, adapter_model.safetensors) + adapterctl.json.",
        group="data",
    )
    format: str = option(
        "auto", "Data format; auto detects it per file from the keys of the records.", group="data", choices=FORMATS
    )
    eval_data: str | None = option(None, "Evaluation data (JSONL, same formats).", group="data")
    eval_split: float = option(
        0.0, "Hold out this fraction (0-0.5) of the training records for evaluation.", group="data"
    )
    train_on_inputs: bool = option(
        False, "Also train on prompts / user turns (default: loss on completions / assistant turns only).", group="data"
    )
    max_seq_len: int = option(
        512, "Truncate tokenized records to this many tokens (the number truncated is reported).", group="data"
    )
    skip_bad_lines: bool = option(
        False, "Skip malformed JSONL lines (counted) instead of refusing to start.", group="data"
    )
    chat_template: str | None = option(
        None, "Jinja chat template file for {messages} data (default: the base model's).", group="data"
    )
    # --- model and LoRA
    base_model: str | None = option(
        None,
        "Base model: gemma-3-270m (default), a local directory or a Hugging Face id.",
        group="lora",
        envvar="ADAPTERCTL_BASE_MODEL",
    )
    rank: int = option(16, "LoRA rank r.", group="lora")
    alpha: float = option(
        32.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).", group="lora"
    )
    dropout: float = option(0.05, "LoRA dropout probability.", group="lora")
    target_modules: list[str] = option(
        list(DEFAULT_TARGET_MODULES), "Comma-separated module names to adapt, or all-linear.", group="lora"
    )
    use_rslora: bool = option(False, "Rank-stabilised LoRA scaling alpha/sqrt(r).", group="lora")
    use_dora: bool = option(
        False,
        "DoRA (weight-decomposed LoRA). Training only: the registry and server refuse DoRA adapters for now.",
        group="lora",
    )
    # --- optimisation
    epochs: float | None = option(
        None, f"Passes over the training data (default {DEFAULT_EPOCHS:g}); exclusive with --max-steps.", group="optim"
    )
    max_steps: int | None = option(None, "Optimizer steps to run; exclusive with --epochs.", group="optim")
    batch_size: int = option(4, "Records per device per micro-batch.", group="optim")
    grad_accum: int = option(1, "Gradient accumulation: micro-batches per optimizer step.", group="optim")
    lr: float = option(2e-4, "Peak learning rate (AdamW).", group="optim")
    lr_scheduler: str = option("linear", "Learning-rate schedule after warmup.", group="optim", choices=SCHEDULERS)
    warmup_ratio: float = option(0.0, "Fraction of steps spent warming up the learning rate.", group="optim")
    warmup_steps: int = option(0, "Warmup steps (overrides --warmup-ratio when > 0).", group="optim")
    weight_decay: float = option(0.0, "AdamW weight decay.", group="optim")
    max_grad_norm: float = option(1.0, "Clip gradients to this global norm (0 disables).", group="optim")
    seed: int = option(42, "Seed for LoRA init, data order, dropout and the eval split.", group="optim")
    precision: str = option(
        "auto",
        "auto = bf16 autocast on GPUs that support it, else fp32 (CPU is always fp32).",
        group="optim",
        choices=PRECISIONS,
    )
    padding_free: bool = option(
        True,
        "Pack each batch's records into one row with per-record attention: no compute on padding, same loss.",
        group="optim",
    )
    group_by_length: bool = option(
        False, "Batch records of similar length together (less padding; changes the batch order).", group="optim"
    )
    # --- run control
    eval_steps: int | None = option(
        None, "Evaluate every N steps (default: every epoch, and always at the end).", group="run"
    )
    save_steps: int | None = option(
        None, "Save a resumable checkpoint every N steps (Ctrl-C always saves one).", group="run"
    )
    checkpoint_dir: str | None = option(
        None,
        "Where checkpoints go (default: OUTPUT.checkpoints next to OUTPUT, which stays a plain PEFT dir).",
        group="run",
    )
    resume: bool = option(False, "Resume from the last checkpoint in the checkpoint directory.", group="run")
    keep_checkpoints: bool = option(
        False, "Keep the checkpoint directory after a successful run (default: remove it).", group="run"
    )
    num_processes: int = option(
        1, "Data-parallel processes (torch.distributed; gloo on CPU, nccl on GPUs).", group="run"
    )
    device: str = option("auto", "auto, cpu or cuda.", group="run", choices=("auto", "cpu", "cuda"))
    progress: bool = option(True, "Show a progress bar with loss and tokens/s.", group="run")
    publish: str | None = option(
        None, "After training, publish the adapter to the registry under this name.", group="run"
    )
    registry: str | None = option(
        None,
        "Registry URI for --publish (default $ADAPTERCTL_REGISTRY or the local registry).",
        group="run",
        envvar="ADAPTERCTL_REGISTRY",
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        self.target_modules = list(self.target_modules)
        for name in ("data", "output"):
            if not getattr(self, name):
                raise InvalidArgument(f"--{name.replace('_', '-')} is required")
        _check(self.format in FORMATS, f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        _check(self.lr_scheduler in SCHEDULERS, f"lr scheduler must be one of {', '.join(SCHEDULERS)}")
        _check(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}")
        _check(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        _check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(bool(self.target_modules), "target modules must not be empty")
        _check(
            "all-linear" not in self.target_modules or len(self.target_modules) == 1,
            "all-linear cannot be combined with module names",
        )
        _check(self.epochs is None or self.max_steps is None, "use either --epochs or --max-steps, not both")
        _check(self.epochs is None or self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, f"max steps must be >= 1, got {self.max_steps}")
        _check(self.batch_size >= 1 and self.grad_accum >= 1, "batch size and grad accumulation must be >= 1")
        _check(self.lr > 0, f"learning rate must be > 0, got {self.lr}")
        _check(
            0.0 <= self.warmup_ratio < 1.0 and self.warmup_steps >= 0,
            "warmup ratio must be in [0, 1) and warmup steps >= 0",
        )
        _check(self.weight_decay >= 0 and self.max_grad_norm >= 0, "weight decay and max grad norm must be >= 0")
        _check(self.max_seq_len >= 2, f"max seq len must be >= 2, got {self.max_seq_len}")
        _check(0.0 <= self.eval_split <= 0.5, f"eval split must be in [0, 0.5], got {self.eval_split}")
        _check(not (self.eval_data and self.eval_split), "use either --eval-data or --eval-split, not both")
        _check(self.eval_steps is None or self.eval_steps >= 1, "eval steps must be >= 1")
        _check(self.save_steps is None or self.save_steps >= 1, "save steps must be >= 1")
        _check(self.num_processes >= 1, "num processes must be >= 1")
        if self.publish is not None:
            from adapterctl.refs import validate_name

            validate_name(self.publish)
            _check(
                not self.use_dora,
                "DoRA adapters cannot be published yet (the registry and server refuse them); "
                "drop --publish or --use-dora",
            )

    @property
    def resolved_epochs(self) -> float:
        return DEFAULT_EPOCHS if self.epochs is None else self.epochs

    @property
    def checkpoints(self) -> Path:
        """The checkpoint directory: ``checkpoint_dir`` or ``OUTPUT.checkpoints`` beside the output."""
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        out = Path(self.output)
        return out.parent / f"{out.name}.checkpoints"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_sources(
        cls, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
    ) -> TrainConfig:
        """Merge defaults < ``config_file`` < ``overrides`` (None values in overrides are ignored)."""
        values: dict[str, Any] = load_config_file(config_file) if config_file else {}
        for key, value in (overrides or {}).items():
            if value is not None and key in _EXCLUSIVE:
                values.pop(_EXCLUSIVE[key], None)
        try:
            return from_kwargs(cls, overrides or {}, lower=values)
        except TypeError as exc:  # unknown keys were filtered; this is a wrong value type
            raise InvalidArgument(f"invalid training config: {exc}") from exc


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON config; keys may use - or _."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the tomli backport (same API)
                import tomli as tomllib

            raw = tomllib.loads(text)
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raise InvalidArgument(f"config file {path}: use .yaml, .yml, .toml or .json")
    except InvalidArgument:
        raise
    except Exception as exc:  # yaml/toml/json parse errors have different types
        raise InvalidArgument(f"config file {path}: cannot parse: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidArgument(f"config file {path}: expected a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidArgument(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return values


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgument(message)
