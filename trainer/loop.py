"""The training run: HF Trainer over the PEFT model, with progress, Ctrl-C checkpoints and export.

``train(config)`` is the Python API behind ``adapterctl train``. With ``num_processes > 1``
outside a distributed launch it re-launches itself under ``torch.distributed.run``
(see :mod:`adapterctl.trainer.launch`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from adapterctl.basemodel import load_tokenizer, resolve_base_model
from adapterctl.errors import AdapterctlError, FailedPrecondition, InvalidArgument
from adapterctl.trainer.callbacks import InterruptCallback, ProgressCallback
from adapterctl.trainer.checkpoints import check_checkpoints, run_record, write_run_record
from adapterctl.trainer.collate import ExampleDataset, PaddingFreeCollator, RightPadCollator
from adapterctl.trainer.config import TrainConfig
from adapterctl.trainer.data import PreparedData, prepare_data
from adapterctl.trainer.launch import write_result
from adapterctl.trainer.manifest import (
    build_manifest,
    perplexity,
    resolved_target_modules,
    save_adapter,
    write_manifest,
)
from adapterctl.trainer.model import build_model

log = logging.getLogger(__name__)


class TrainingInterrupted(AdapterctlError):
    """Ctrl-C (SIGINT/SIGTERM) stopped the run after saving a resumable checkpoint."""

    status = "CANCELLED"

    def __init__(self, step: int, checkpoint_dir: Path):
        super().__init__(
            f"interrupted at step {step}; checkpoint saved in {checkpoint_dir}; rerun with --resume to continue"
        )
        self.step = step
        self.checkpoint_dir = checkpoint_dir


@dataclass
class TrainResult:
    """What a finished run produced. ``losses`` is the per-optimizer-step training loss
    (index i = step i+1, including steps done before a resume); ``train_loss`` is the mean
    of the last epoch's worth of steps."""

    output_dir: Path
    train_loss: float
    losses: list[float]
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    steps: int = 0
    tokens: int = 0  # non-padding tokens trained on by this process (x num_processes for the run)
    tokens_per_s: float = 0.0
    wall_time_s: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict)
    published: str | None = None  # NAME:VERSION when --publish was given


class AdapterTrainer(Trainer):
    """Trainer that counts tokens for tokens/s and evaluates token-weighted loss (for perplexity)."""

    def __init__(self, *args: Any, eval_examples: ExampleDataset | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.eval_examples = eval_examples
        self.tokens_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            mask = inputs.get("attention_mask")
            self.tokens_seen += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float | None]:
        """Mean cross-entropy over all eval label tokens. Every rank evaluates the whole
        (small) eval set unsharded, so all ranks agree without communication."""
        if self.eval_examples is None:
            return {}
        loader = torch.utils.data.DataLoader(self.eval_examples, batch_size=self.args.per_device_eval_batch_size,
                                             collate_fn=self.data_collator)
        model = self.model
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad(), self.accelerator.autocast():
            for batch in loader:
                batch = {k: v.to(self.args.device) for k, v in batch.items()}
                n = int((batch["labels"][:, 1:] != -100).sum())
                total += float(model(**batch).loss) * n
                count += n
        model.train(was_training)
        loss = total / max(count, 1)
        metrics: dict[str, float | None] = {
            f"{metric_key_prefix}_loss": loss,
            f"{metric_key_prefix}_perplexity": perplexity(loss),
            f"{metric_key_prefix}_tokens": count,
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics


def train(config: TrainConfig, callbacks: list[Any] | None = None) -> TrainResult:
    """Train a LoRA adapter per ``config``; write it to ``config.output``; optionally publish.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects (single-process runs).
    Raises TrainingInterrupted after Ctrl-C (a checkpoint is saved), InvalidArgument for bad
    data/options, FailedPrecondition for checkpoint/resume mismatches."""
    if config.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        from adapterctl.trainer.launch import launch_distributed

        return launch_distributed(config)
    started = time.perf_counter()
    base = resolve_base_model(config.base_model, progress=config.progress)
    tokenizer = _tokenizer(base, config.chat_template)
    data = prepare_data(config, tokenizer)
    record = run_record(config, data.lineage())
    resume_from = check_checkpoints(config, record)
    model = build_model(config, str(base.path))
    train_set = ExampleDataset(data.train.examples)
    eval_set = ExampleDataset(data.eval.examples) if data.eval else None
    interrupt = InterruptCallback()
    progress = ProgressCallback(enabled=config.progress)
    trainer = AdapterTrainer(
        model=model, args=training_arguments(config, has_eval=eval_set is not None),
        train_dataset=train_set, eval_dataset=eval_set, eval_examples=eval_set,
        data_collator=_collator(config, tokenizer.pad_token_id), callbacks=[*(callbacks or []), interrupt, progress],
    )
    progress.trainer = trainer
    trainer.remove_callback(_default_progress_callback())
    if trainer.is_world_process_zero():
        write_run_record(config, record)
    with interrupt.installed():
        trainer.train(resume_from_checkpoint=resume_from)
    if interrupt.stopped_at is not None:
        if trainer.is_world_process_zero():
            write_result({"interrupted_at": interrupt.stopped_at})
        raise TrainingInterrupted(interrupt.stopped_at, config.checkpoints)
    metrics = _final_metrics(trainer, data)
    wall = time.perf_counter() - started
    result = TrainResult(output_dir=Path(config.output), train_loss=metrics["train_loss"], losses=_step_losses(trainer),
                         eval_loss=metrics["eval_loss"], eval_perplexity=metrics["eval_perplexity"],
                         steps=trainer.state.global_step, tokens=trainer.tokens_seen,
                         tokens_per_s=progress.tokens_per_s(), wall_time_s=wall)
    if trainer.is_world_process_zero():
        out = Path(config.output)
        save_adapter(model, out, base)
        manifest = build_manifest(config, base, lora_targets=resolved_target_modules(model), dataset=data.lineage(),
                                  metrics=metrics, wall_time_s=wall,
                                  extra={"steps": result.steps, "tokens_per_s": round(result.tokens_per_s, 1)})
        write_manifest(out, manifest)
        result.manifest = manifest
        if not config.keep_checkpoints:
            shutil.rmtree(config.checkpoints, ignore_errors=True)
        if config.publish:
            result.published = publish(out, config.publish, config.registry)
        write_result(dataclasses.asdict(result))
    trainer.accelerator.wait_for_everyone()
    return result


def _collator(config: TrainConfig, pad_id: int) -> Any:
    return PaddingFreeCollator(pad_id) if config.padding_free else RightPadCollator(pad_id)


@functools.lru_cache(maxsize=2)
def _tokenizer(base: Any, chat_template: str | None) -> Any:
    """Tokenizers of large vocabularies take seconds to parse; reuse them across runs in one process."""
    return load_tokenizer(base, chat_template)


def training_arguments(config: TrainConfig, has_eval: bool) -> TrainingArguments:
    use_cpu = config.device == "cpu" or not torch.cuda.is_available()
    if config.device == "cuda" and use_cpu:
        raise FailedPrecondition("--device cuda: no CUDA device is available")
    bf16 = config.precision == "bf16" or (config.precision == "auto" and not use_cpu and torch.cuda.is_bf16_supported())
    if config.precision == "fp16" and use_cpu:
        raise InvalidArgument("fp16 needs a CUDA device; use --precision bf16 or fp32 on CPU")
    eval_strategy = "no" if not has_eval else ("steps" if config.eval_steps else "epoch")
    return TrainingArguments(
        output_dir=str(config.checkpoints),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.resolved_epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps if config.warmup_steps > 0 else config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        bf16=bf16,
        fp16=config.precision == "fp16",
        use_cpu=use_cpu,
        logging_steps=1,
        eval_strategy=eval_strategy,
        eval_steps=config.eval_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=not use_cpu,
        ddp_find_unused_parameters=False,
    )


def publish(output_dir: Path, name: str, registry_uri: str | None) -> str:
    """Publish ``output_dir`` as the next version of ``name``; returns ``NAME:VERSION``."""
    from adapterctl.registry import open_registry  # lazy: the registry is optional for training

    manifest = open_registry(registry_uri).publish(output_dir, name)
    return f"{manifest.name}:{manifest.version}"


def _step_losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h]


def _final_metrics(trainer: AdapterTrainer, data: PreparedData) -> dict[str, Any]:
    losses = _step_losses(trainer)
    args = trainer.args
    window = max(1, math.ceil(len(data.train.examples) / (args.train_batch_size * args.gradient_accumulation_steps
                                                           * args.world_size)))
    tail = losses[-window:]
    train_loss = sum(tail) / len(tail) if tail else float("nan")
    eval_loss = None
    if data.eval is not None:
        last = [h for h in trainer.state.log_history if "eval_loss" in h]
        if last and last[-1].get("step") == trainer.state.global_step:
            eval_loss = last[-1]["eval_loss"]
        else:
            eval_loss = trainer.evaluate()["eval_loss"]
    return {"train_loss": train_loss, "train_perplexity": perplexity(train_loss), "eval_loss": eval_loss,
            "eval_perplexity": perplexity(eval_loss)}


def _default_progress_callback():
    from transformers.trainer_callback import PrinterCallback

    return PrinterCallback
