"""TrainConfig: the one definition of every training option, its help text and its validation.

The CLI options (:mod:`adapterctl.client.cli.train_cmd`) and the config-file loader
are generated from the dataclass fields, so an option is written down exactly once.
Precedence: dataclass defaults < config file (YAML/TOML) < CLI flags.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterctl.errors import InvalidArgument

FORMATS = ("auto", "text", "prompt_completion", "messages")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
DEFAULT_EPOCHS = 3.0
# Pairs where setting one in a higher-precedence source clears the other from lower ones.
_EXCLUSIVE = {"epochs": "max_steps", "max_steps": "epochs", "eval_data": "eval_split", "eval_split": "eval_data"}


def _opt(default: Any, help: str, group: str, **extra: Any) -> Any:
    """A dataclass field carrying its CLI help text and option group in ``metadata``."""
    meta = {"help": help, "group": group, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Resolved options of one training run. Paths are kept as given (strings) so the
    config serialises to JSON unchanged; ``__post_init__`` normalises and validates."""

    # --- data
    data: str = _opt("", "Training data, JSONL: {text} | {prompt, completion} | {messages: [{role, content}]}.", "data", required=True)
    output: str = _opt("", "Output directory: a PEFT adapter (adapter_config.json, adapter_model.safetensors) + adapterctl.json.", "data", required=True)
    format: str = _opt("auto", "Data format; auto detects it per file from the keys of the records.", "data", choices=FORMATS)
    eval_data: str | None = _opt(None, "Evaluation data (JSONL, same formats).", "data")
    eval_split: float = _opt(0.0, "Hold out this fraction (0-0.5) of the training records for evaluation.", "data")
    train_on_inputs: bool = _opt(False, "Also train on prompts / user turns (default: loss on completions / assistant turns only).", "data")
    max_seq_len: int = _opt(512, "Truncate tokenized records to this many tokens (the number truncated is reported).", "data")
    skip_bad_lines: bool = _opt(False, "Skip malformed JSONL lines (counted) instead of refusing to start.", "data")
    chat_template: str | None = _opt(None, "Jinja chat template file for {messages} data (default: the base model's).", "data")
    # --- model and LoRA
    base_model: str | None = _opt(None, "Base model: gemma-3-270m (default), a local directory or a Hugging Face id.", "lora", envvar="ADAPTERCTL_BASE_MODEL")
    rank: int = _opt(16, "LoRA rank r.", "lora")
    alpha: float = _opt(32.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).", "lora")
    dropout: float = _opt(0.05, "LoRA dropout probability.", "lora")
    target_modules: list[str] = _opt(list(DEFAULT_TARGET_MODULES), "Comma-separated module names to adapt, or all-linear.", "lora")
    use_rslora: bool = _opt(False, "Rank-stabilised LoRA scaling alpha/sqrt(r).", "lora")
    use_dora: bool = _opt(False, "DoRA (weight-decomposed LoRA). Training only: the registry and server refuse DoRA adapters for now.", "lora")
    # --- optimisation
    epochs: float | None = _opt(None, f"Passes over the training data (default {DEFAULT_EPOCHS:g}); exclusive with --max-steps.", "optim")
    max_steps: int | None = _opt(None, "Optimizer steps to run; exclusive with --epochs.", "optim")
    batch_size: int = _opt(4, "Records per device per micro-batch.", "optim")
    grad_accum: int = _opt(1, "Gradient accumulation: micro-batches per optimizer step.", "optim")
    lr: float = _opt(2e-4, "Peak learning rate (AdamW).", "optim")
    lr_scheduler: str = _opt("linear", "Learning-rate schedule after warmup.", "optim", choices=SCHEDULERS)
    warmup_ratio: float = _opt(0.0, "Fraction of steps spent warming up the learning rate.", "optim")
    warmup_steps: int = _opt(0, "Warmup steps (overrides --warmup-ratio when > 0).", "optim")
    weight_decay: float = _opt(0.0, "AdamW weight decay.", "optim")
    max_grad_norm: float = _opt(1.0, "Clip gradients to this global norm (0 disables).", "optim")
    seed: int = _opt(42, "Seed for LoRA init, data order, dropout and the eval split.", "optim")
    precision: str = _opt("auto", "auto = bf16 autocast on GPUs that support it, else fp32 (CPU is always fp32).", "optim", choices=PRECISIONS)
    padding_free: bool = _opt(True, "Pack each batch's records into one row with per-record attention: no compute on padding, same loss.", "optim")
    group_by_length: bool = _opt(False, "Batch records of similar length together (less padding; changes the batch order).", "optim")
    # --- run control
    eval_steps: int | None = _opt(None, "Evaluate every N steps (default: every epoch, and always at the end).", "run")
    save_steps: int | None = _opt(None, "Save a resumable checkpoint every N steps (Ctrl-C always saves one).", "run")
    checkpoint_dir: str | None = _opt(None, "Where checkpoints go (default: OUTPUT.checkpoints next to OUTPUT, which stays a plain PEFT dir).", "run")
    resume: bool = _opt(False, "Resume from the last checkpoint in the checkpoint directory.", "run")
    keep_checkpoints: bool = _opt(False, "Keep the checkpoint directory after a successful run (default: remove it).", "run")
    num_processes: int = _opt(1, "Data-parallel processes (torch.distributed; gloo on CPU, nccl on GPUs).", "run")
    device: str = _opt("auto", "auto, cpu or cuda.", "run", choices=("auto", "cpu", "cuda"))
    progress: bool = _opt(True, "Show a progress bar with loss and tokens/s.", "run")
    publish: str | None = _opt(None, "After training, publish the adapter to the registry under this name.", "run")
    registry: str | None = _opt(None, "Registry URI for --publish (default $ADAPTERCTL_REGISTRY or the local registry).", "run", envvar="ADAPTERCTL_REGISTRY")

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
        _check("all-linear" not in self.target_modules or len(self.target_modules) == 1, "all-linear cannot be combined with module names")
        _check(self.epochs is None or self.max_steps is None, "use either --epochs or --max-steps, not both")
        _check(self.epochs is None or self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, f"max steps must be >= 1, got {self.max_steps}")
        _check(self.batch_size >= 1 and self.grad_accum >= 1, "batch size and grad accumulation must be >= 1")
        _check(self.lr > 0, f"learning rate must be > 0, got {self.lr}")
        _check(0.0 <= self.warmup_ratio < 1.0 and self.warmup_steps >= 0, "warmup ratio must be in [0, 1) and warmup steps >= 0")
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
            _check(not self.use_dora, "DoRA adapters cannot be published yet (the registry and server refuse them); drop --publish or --use-dora")

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
    def from_sources(cls, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Merge defaults < ``config_file`` < ``overrides`` (None values in overrides are ignored)."""
        values: dict[str, Any] = load_config_file(config_file) if config_file else {}
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key in _EXCLUSIVE:
                values.pop(_EXCLUSIVE[key], None)
            values[key] = value
        try:
            return cls(**values)
        except TypeError as exc:  # unknown keys were filtered; this is a wrong value type
            raise InvalidArgument(f"invalid training config: {exc}") from exc


def option_fields() -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) for every option, in declaration order."""
    hints = typing.get_type_hints(TrainConfig)
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


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
