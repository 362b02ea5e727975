"""Seeded fuzzing of the trainer's JSONL reader (``adapterctl.trainer.data.load_jsonl``):
invalid UTF-8, deep nesting, huge lines, wrong types, BOMs, NULs. Invariant: every file
either loads or is refused with InvalidArgument; the peak Python allocation while
reading stays under a bound proportional to the file (no blow-up on a huge line)."""
from __future__ import annotations

import json
import random
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

from adapterctl.errors import AdapterctlError
from bench.reliability.fuzz_grpc import hostile_strings


@dataclass
class JsonlFuzzReport:
    inputs: int = 0
    loaded: int = 0
    refused: int = 0
    crashes: int = 0
    huge_line_bytes: int = 0
    huge_line_peak_bytes: int = 0
    examples: list[str] = field(default_factory=list)


def _value(rng: random.Random, depth: int = 0):
    """A random JSON value of any type, nested at most 3 deep."""
    makers = [lambda: None, lambda: True, lambda: 1, lambda: -2**63, lambda: 1e308, lambda: hostile_strings(rng)]
    if depth < 3:
        makers += [lambda: [_value(rng, depth + 1)], lambda: {"text": _value(rng, depth + 1)},
                   lambda: [{"role": rng.choice(("user", "assistant", "x", 3)), "content": _value(rng, depth + 1)}]]
    return rng.choice(makers)()


def _line(rng: random.Random) -> bytes:
    pick = rng.randrange(14)
    if pick == 0:
        return b'{"text": "' + bytes([0xff, 0xfe, 0xc3]) + b'"}'           # invalid UTF-8
    if pick == 1:
        n = rng.choice((100, 10_000, 200_000))
        return b'{"text": ' + b"[" * n + b"]" * n + b"}"                      # deep nesting
    if pick == 2:
        return b"\xef\xbb\xbf" + json.dumps({"text": "bom"}).encode()        # UTF-8 BOM
    if pick == 3:
        return json.dumps({"text": "nul\x00inside"}).encode()
    if pick == 4:
        return b"{" + b'"a":1,' * rng.randrange(1, 1000)                      # truncated object
    if pick == 5:
        return json.dumps([1, 2, 3]).encode()
    if pick == 6:
        return json.dumps({"messages": _value(rng)}).encode()
    if pick == 7:
        return json.dumps({"prompt": _value(rng), "completion": _value(rng)}).encode()
    if pick == 8:
        return json.dumps({"text": _value(rng)}).encode()
    if pick == 9:
        return b'{"text": NaN}'
    if pick == 10:
        return json.dumps({"text": "ok", "text2": "x" * rng.randrange(10_000)}).encode()
    if pick == 11:
        return b'{"text": "\\ud800"}'                                          # lone surrogate escape
    if pick == 12:
        return json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                           "content": hostile_strings(rng)}]}).encode()
    return json.dumps({"text": "a fine record"}).encode()


def fuzz_jsonl(root: Path, n: int, seed: int, huge_line_mb: int) -> JsonlFuzzReport:
    from adapterctl.trainer.data import load_jsonl

    rng = random.Random(seed)
    report = JsonlFuzzReport()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = root / f"f{i % 16}.jsonl"
        path.write_bytes(b"\n".join(_line(rng) for _ in range(rng.randrange(1, 6))) + b"\n")
        report.inputs += 1
        try:
            load_jsonl(path, skip_bad_lines=rng.random() < 0.3)
            report.loaded += 1
        except AdapterctlError:
            report.refused += 1
        except Exception as exc:  # noqa: BLE001 - the finding
            report.crashes += 1
            if len(report.examples) < 10:
                report.examples.append(f"{type(exc).__name__}: {str(exc)[:200]}")
    # One huge line: peak memory while reading it must stay a small multiple of its size.
    path = root / "huge.jsonl"
    with path.open("wb") as fh:
        fh.write(b'{"text": "')
        chunk = b"x" * (1 << 20)
        for _ in range(huge_line_mb):
            fh.write(chunk)
        fh.write(b'"}\n')
    report.huge_line_bytes = path.stat().st_size
    tracemalloc.start()
    report.inputs += 1
    try:
        load_jsonl(path)
        report.loaded += 1
    except AdapterctlError:
        report.refused += 1
    except Exception as exc:  # noqa: BLE001
        report.crashes += 1
        report.examples.append(f"huge line: {type(exc).__name__}: {str(exc)[:200]}")
    report.huge_line_peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    path.unlink()
    return report
