"""Held-out loss and perplexity of one adapter version (or the bare base) on a JSONL
file, with the trainer's own data pipeline: the same formats, chat template and loss
masks as training, so the figure is comparable with ``eval_loss`` from ``train``.

``loss`` is the mean cross-entropy over every label token of the file (token-weighted,
not a mean of per-record means); ``perplexity`` is ``exp(loss)``.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from adapterctl.basemodel import BaseModel, load_model, load_tokenizer, resolve_base_model
from adapterctl.errors import FailedPrecondition
from adapterctl.trainer.collate import RightPadCollator
from adapterctl.trainer.data import IGNORE_INDEX, load_jsonl, tokenize
from adapterctl.trainer.manifest import perplexity


@dataclass(frozen=True)
class EvalResult:
    ref: str  # NAME:VERSION, or "" for the base model
    loss: float
    perplexity: float | None  # None when the loss is not finite
    tokens: int  # label tokens scored
    records: int
    data_sha256: str
    base_model: str

    def labels(self) -> dict[str, str]:
        """What ``--record`` stores on the version (label values are strings)."""
        ppl = "inf" if self.perplexity is None else f"{self.perplexity:.6g}"
        return {"eval.loss": f"{self.loss:.6g}", "eval.perplexity": ppl,
                "eval.tokens": str(self.tokens), "eval.data": self.data_sha256}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_ref(registry: Any, ref: str, data: Path, *, base_model: str | None = None, max_seq_len: int = 1024,
                 batch_size: int = 8, device: str = "cpu") -> EvalResult:
    """Pull ``ref`` from ``registry`` and evaluate it on the base its manifest names
    (``base_model`` overrides; its fingerprint must match the manifest's)."""
    manifest = registry.resolve(ref)
    base = resolve_base_model(base_model or manifest.base_model.get("id"), progress=False)
    expected = manifest.base_model.get("fingerprint")
    if expected and expected != base.fingerprint:
        raise FailedPrecondition(f"{manifest.ref} was published for base {expected[:19]}... but "
                                 f"{base.id} is {base.fingerprint[:19]}...; pass --base-model")
    with tempfile.TemporaryDirectory(prefix="adapterctl-eval-") as tmp:
        adapter_dir = registry.pull(manifest, Path(tmp) / "adapter")
        result = evaluate(base, adapter_dir, data, max_seq_len=max_seq_len, batch_size=batch_size, device=device)
    return EvalResult(**{**result.to_dict(), "ref": manifest.ref})


def evaluate(base: BaseModel, adapter_dir: Path | None, data: Path, *, max_seq_len: int = 1024,
             batch_size: int = 8, device: str = "cpu") -> EvalResult:
    """Loss and perplexity of ``base`` + the PEFT adapter in ``adapter_dir`` (None: the base alone)."""
    tokenizer = load_tokenizer(base)
    records = load_jsonl(data)
    examples = tokenize(records, tokenizer, max_seq_len=max_seq_len, train_on_inputs=False).examples
    model = load_model(base, device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    collate = RightPadCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in chunk])
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits.float()
            targets = batch["labels"][:, 1:].to(device)  # position t predicts token t+1
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    return EvalResult(ref="", loss=loss, perplexity=perplexity(loss), tokens=count, records=len(examples),
                      data_sha256="sha256:" + records.sha256, base_model=base.id)
