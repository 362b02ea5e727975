"""Training data: JSONL reading with per-line validation, format detection, tokenization and label masks.

Formats (detected per file from the first valid record's keys, or forced with ``format``):
  * ``text``: ``{"text": str}``; loss on every token; EOS appended.
  * ``prompt_completion``: ``{"prompt": str, "completion": str}``; loss on the completion
    (+ EOS) only unless ``train_on_inputs``; prompt and completion are concatenated as given.
  * ``messages``: ``{"messages": [{"role", "content"}, ...]}`` rendered by the chat template;
    loss on assistant turns only (the template's ``{% generation %}`` marks) unless ``train_on_inputs``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterctl.errors import InvalidArgument

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
_MAX_REPORTED = 5


@dataclass
class Example:
    """One tokenized record: ``input_ids`` and ``labels`` have the same length [seq];
    ``labels[i] == -100`` where position ``i`` carries no loss."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class DataFile:
    """Validated records of one JSONL file plus what was wrong with it."""

    path: Path
    sha256: str
    format: str
    records: list[dict[str, Any]]
    line_numbers: list[int]
    skipped: int = 0


@dataclass
class TokenizedData:
    """Tokenized examples and the counts a user should see."""

    examples: list[Example]
    truncated: int = 0
    dropped: int = 0  # records left with no trainable token (e.g. prompt longer than max_seq_len)
    tokens: int = field(default=0)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_jsonl(path: str | Path, fmt: str = "auto", skip_bad_lines: bool = False) -> DataFile:
    """Read and validate ``path``. Malformed lines raise InvalidArgument naming ``file:line``
    (the first few of them) unless ``skip_bad_lines``, which drops and counts them."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"data file {path} does not exist")
    records: list[dict[str, Any]] = []
    line_numbers: list[int] = []
    bad: list[str] = []
    with path.open("r", encoding="utf-8", errors="strict") as fh:
        try:  # line by line: memory holds one line (however long) plus the parsed records
            for lineno, line in enumerate(fh, start=1):
                fmt = _read_line(path, lineno, line, fmt, records, line_numbers, bad)
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"{path}: not UTF-8 text ({exc.reason})") from exc
    if bad and not skip_bad_lines:
        more = f" (and {len(bad) - _MAX_REPORTED} more)" if len(bad) > _MAX_REPORTED else ""
        raise InvalidArgument("; ".join(bad[:_MAX_REPORTED]) + more + "; fix them or pass --skip-bad-lines")
    if bad:
        log.warning("skipped %d malformed line(s) in %s, first: %s", len(bad), path, bad[0])
    if not records:
        raise InvalidArgument(f"{path}: no usable records")
    return DataFile(path=path, sha256=file_sha256(path), format=fmt if fmt != "auto" else "text",
                    records=records, line_numbers=line_numbers, skipped=len(bad))


def _read_line(path: Path, lineno: int, line: str, fmt: str, records: list[dict[str, Any]],
               line_numbers: list[int], bad: list[str]) -> str:
    """Parse one line into ``records`` (or a message into ``bad``); returns the format, detected
    from the first good record when ``fmt`` is auto."""
    if not line.strip():
        return fmt
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        bad.append(f"{path}:{lineno}: invalid JSON ({exc.msg})")
        return fmt
    except RecursionError:
        bad.append(f"{path}:{lineno}: invalid JSON (nested too deeply)")
        return fmt
    if not isinstance(record, dict):
        bad.append(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        return fmt
    if fmt == "auto":
        detected = detect_format(record)
        if detected is None:
            bad.append(f"{path}:{lineno}: cannot tell the format from keys {sorted(record)}; "
                       "expected text, prompt+completion or messages")
            return fmt
        fmt = detected
    problem = validate_record(record, fmt)
    if problem:
        bad.append(f"{path}:{lineno}: {problem}")
        return fmt
    records.append(record)
    line_numbers.append(lineno)
    return fmt


def detect_format(record: dict[str, Any]) -> str | None:
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def validate_record(record: dict[str, Any], fmt: str) -> str | None:
    """Why ``record`` is not a valid ``fmt`` record, or None."""
    if fmt == "text":
        if not isinstance(record.get("text"), str) or not record["text"].strip():
            return 'expected {"text": non-empty string}'
    elif fmt == "prompt_completion":
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
            return 'expected {"prompt": string, "completion": string}'
        if not record["completion"]:
            return "empty completion"
    elif fmt == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            return 'expected {"messages": [{"role": ..., "content": ...}, ...]}'
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
                return f"messages[{i}]: expected {{role: {'|'.join(ROLES)}, content: string}}"
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant message to learn from"
    else:
        raise InvalidArgument(f"unknown data format {fmt!r}")
    return None


def split_eval(data: DataFile, fraction: float, seed: int) -> tuple[DataFile, DataFile]:
    """Deterministically hold out ``fraction`` of the records (at least one) as eval data."""
    order = list(range(len(data.records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(order)))
    if n_eval >= len(order):
        raise InvalidArgument(f"{data.path}: {len(order)} record(s) are too few for --eval-split {fraction}")
    eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])

    def subset(idx: list[int]) -> DataFile:
        return DataFile(data.path, data.sha256, data.format, [data.records[i] for i in idx],
                        [data.line_numbers[i] for i in idx], data.skipped)

    return subset(train_idx), subset(eval_idx)


def tokenize(data: DataFile, tokenizer: Any, *, max_seq_len: int, train_on_inputs: bool) -> TokenizedData:
    """Tokenize every record of ``data`` (see the module docstring for the label rules)."""
    out = TokenizedData(examples=[])
    for record, lineno in zip(data.records, data.line_numbers):
        ids, labels = _encode(record, data.format, tokenizer, train_on_inputs, where=f"{data.path}:{lineno}")
        if len(ids) > max_seq_len:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            out.truncated += 1
        if all(label == IGNORE_INDEX for label in labels[1:]):
            out.dropped += 1
            continue
        out.examples.append(Example(ids, labels))
        out.tokens += len(ids)
    if not out.examples:
        raise InvalidArgument(f"{data.path}: no record has a trainable token within --max-seq-len {max_seq_len}")
    return out


def _encode(
    record: dict[str, Any], fmt: str, tok: Any, train_on_inputs: bool, where: str
) -> tuple[list[int], list[int]]:
    eos = tok.eos_token_id
    if fmt == "text":
        ids = tok(record["text"])["input_ids"] + [eos]
        return ids, list(ids)
    if fmt == "prompt_completion":
        prompt = tok(record["prompt"])["input_ids"]
        completion = tok(record["completion"], add_special_tokens=False)["input_ids"] + [eos]
        ids = prompt + completion
        labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt) + completion
        return ids, labels
    return _encode_messages(record["messages"], tok, train_on_inputs, where)


def _encode_messages(
    messages: list[dict[str, str]], tok: Any, train_on_inputs: bool, where: str
) -> tuple[list[int], list[int]]:
    if not tok.chat_template:
        raise InvalidArgument("the tokenizer has no chat template; pass --chat-template FILE for messages data")
    try:
        rendered = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=not train_on_inputs)
    except Exception as exc:  # jinja raise_exception surfaces as TemplateError
        raise InvalidArgument(f"{where}: chat template rejected the messages: {exc}") from exc
    ids = list(rendered["input_ids"])
    if train_on_inputs:
        return ids, list(ids)
    mask = rendered.get("assistant_masks") or []
    if not any(mask):
        raise InvalidArgument(
            f"{where}: the chat template marks no assistant tokens; it needs {{% generation %}} blocks "
            "for assistant-only loss (or pass --train-on-inputs)"
        )
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


@dataclass
class PreparedData:
    """Train (and optional eval) data, tokenized, with their provenance."""

    train_file: DataFile
    train: TokenizedData
    eval_file: DataFile | None = None
    eval: TokenizedData | None = None

    def lineage(self) -> dict[str, Any]:
        """The ``training.dataset`` block of adapterctl.json."""
        return {
            "format": self.train_file.format,
            "train_sha256": self.train_file.sha256,
            "train_records": len(self.train.examples),
            "train_tokens": self.train.tokens,
            "eval_sha256": self.eval_file.sha256 if self.eval_file else None,
            "eval_records": len(self.eval.examples) if self.eval else 0,
            "skipped_lines": self.train_file.skipped + (self.eval_file.skipped if self.eval_file else 0),
            "truncated": self.train.truncated + (self.eval.truncated if self.eval else 0),
            "dropped": self.train.dropped + (self.eval.dropped if self.eval else 0),
        }


def prepare_data(config: Any, tokenizer: Any) -> PreparedData:
    """Load, validate, split and tokenize the data named by a TrainConfig; logs what was
    truncated, dropped or skipped."""
    train_file = load_jsonl(config.data, config.format, config.skip_bad_lines)
    eval_file = None
    if config.eval_data:
        eval_file = load_jsonl(config.eval_data, config.format if config.format != "auto" else "auto",
                               config.skip_bad_lines)
    elif config.eval_split:
        train_file, eval_file = split_eval(train_file, config.eval_split, config.seed)
    kw = {"max_seq_len": config.max_seq_len, "train_on_inputs": config.train_on_inputs}
    prepared = PreparedData(train_file, tokenize(train_file, tokenizer, **kw), eval_file,
                            tokenize(eval_file, tokenizer, **kw) if eval_file else None)
    info = prepared.lineage()
    if info["truncated"]:
        log.warning("truncated %d record(s) to --max-seq-len %d tokens", info["truncated"], config.max_seq_len)
    if info["dropped"]:
        log.warning("dropped %d record(s) with no trainable token after truncation", info["dropped"])
    log.info("data: %s format, %d train / %d eval records, %d train tokens", info["format"],
             info["train_records"], info["eval_records"], info["train_tokens"])
    return prepared
