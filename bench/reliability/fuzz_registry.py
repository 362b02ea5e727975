"""Seeded fuzzing of registry inputs: publish names, adapter directories with broken
configs, lineage, safetensors headers and tensors, extra files, pickles and symlinks;
tampered manifests on the read path; and the server's loader on the same directories.

Invariants: a bad input is refused with an ``AdapterctlError`` (one-line message, never
another exception), a refused publish writes nothing, and nothing bad is accepted.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adapterctl.errors import AdapterctlError
from bench.reliability.common import write_adapter
from bench.reliability.fuzz_grpc import hostile_strings

CONFIG, WEIGHTS, META = "adapter_config.json", "adapter_model.safetensors", "adapterctl.json"


@dataclass
class RegistryFuzzReport:
    inputs: int = 0
    refused: int = 0
    accepted: int = 0            # publishes of benign mutations that rightly succeeded
    crashes: int = 0             # exceptions that are not AdapterctlError
    accepted_bad: int = 0        # a bad input that was published
    wrote_on_refusal: int = 0    # a refused publish that changed the registry
    examples: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(what[:300])


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _json_edit(path: Path, rng: random.Random) -> None:
    data = json.loads(path.read_text())
    key = rng.choice(sorted(data) + ["r", "target_modules", "peft_type", "use_dora", "modules_to_save",
                                     "lora_alpha", "base_model", "lora", "format"])
    data[key] = rng.choice((None, 0, -1, 2**63, 1e308, "4", [], {}, [None], "LOHA", True, hostile_strings(rng),
                            {"fingerprint": "sha256:" + "0" * 64}, {"fingerprint": "md5:x"}))
    path.write_text(json.dumps(data))


def _header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_st(path: Path, header: dict[str, Any], data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _st_edit(path: Path, rng: random.Random) -> bool:
    """Break the safetensors file in one of 11 ways (True), or add harmless metadata (False)."""
    header, data = _header(path)
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    pick = rng.randrange(12)
    if pick == 0:
        header[key]["dtype"] = rng.choice(("I32", "BOOL", "U8", "F8_E4M3", "X", 7))
    elif pick == 1:
        header[key]["shape"] = rng.choice(([], [0, 4], [4], [3, 640], [4, 641], [2**40, 2], ["a", 1], None))
    elif pick == 2:
        header[key]["data_offsets"] = rng.choice(([0, 2**62], [10, 5], [-1, 4], [0], None, [0, len(data) + 4]))
    elif pick == 3:
        header[re.sub(r"layers\.\d+\.", "layers.999.", key)] = header.pop(key)
    elif pick == 4:
        header[re.sub(r"lora_[AB]", "lora_C", key)] = header.pop(key)
    elif pick == 5:
        header.pop(key)
    elif pick == 6:
        header[rng.choice(("bias", "../../x", "base_model.model.lm_head.weight", "\x00"))] = header[key]
    elif pick == 7:  # NaN / Inf inside the data
        start = header[key]["data_offsets"][0]
        data = data[:start] + struct.pack("<f", rng.choice((float("nan"), float("inf")))) + data[start + 4:]
    elif pick == 8:  # truncated file
        raw = path.read_bytes()
        path.write_bytes(raw[:rng.randrange(0, len(raw))])
        return True
    elif pick == 9:  # header length bigger than the file / absurd
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", rng.choice((len(raw), 2**63, 100 << 20))) + raw[8:])
        return True
    elif pick == 10:  # header that is not JSON
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
        return True
    else:
        header["__metadata__"] = {"format": rng.choice(("pt", "pickle")), "x": "y" * 1000}
        _write_st(path, header, data)
        return False  # metadata is ignored
    _write_st(path, header, data)
    return True


def mutations(outside: Path) -> list[tuple[str, bool, Callable[[Path, random.Random], bool | None]]]:
    """``(label, must_refuse, mutate(dir, rng))``; a mutation may return its own must_refuse."""

    def link_outside(d: Path, rng: random.Random) -> None:
        target = rng.choice((outside / WEIGHTS, Path("/etc/passwd"), outside))
        os.remove(d / WEIGHTS)
        os.symlink(target, d / WEIGHTS)

    def extra(d: Path, rng: random.Random) -> None:
        name = rng.choice(("adapter_model.bin", "training_args.bin", "x.pt", "x.pkl", "optimizer.pth", "notes.txt",
                           ".hidden"))
        (d / name).write_bytes(b"\x80\x04\x95" + os.urandom(32))  # a pickle header

    def subdir(d: Path, rng: random.Random) -> None:
        (d / rng.choice(("sub", "checkpoint-1"))).mkdir()

    def link_dir(d: Path, rng: random.Random) -> None:
        os.symlink(outside, d / "linked")

    def pickle_only(d: Path, rng: random.Random) -> None:
        os.rename(d / WEIGHTS, d / "adapter_model.bin")

    def bad_json(d: Path, rng: random.Random) -> None:
        f = d / rng.choice((CONFIG, META))
        f.write_text(rng.choice(("{", "[]", "null", "\xff", '{"r": 4' * 1000, "[" * 100_000)))

    def missing(d: Path, rng: random.Random) -> None:
        os.remove(d / rng.choice((CONFIG, WEIGHTS)))

    return [
        ("config field", False, lambda d, rng: _json_edit(d / CONFIG, rng)),
        ("lineage field", False, lambda d, rng: _json_edit(d / META, rng)),
        ("safetensors", False, lambda d, rng: _st_edit(d / WEIGHTS, rng)),
        ("symlink weights", True, link_outside), ("extra file", True, extra), ("subdir", True, subdir),
        ("symlinked dir", True, link_dir), ("pickle only", True, pickle_only), ("bad json", True, bad_json),
        ("missing file", True, missing),
    ]


def fuzz_registry(registry: Any, registry_root: Path, base: Any, server_loader: Callable[[Path], Any], root: Path,
                  n: int, seed: int) -> RegistryFuzzReport:
    """``n`` publish attempts of mutated adapters plus ``server_loader`` on each directory,
    and ``n // 10`` hostile names / refs."""
    rng = random.Random(seed)
    report = RegistryFuzzReport()
    good = write_adapter(root / "good", base, seed)
    outside = write_adapter(root / "outside", base, seed + 1)
    muts = mutations(outside)
    for i in range(n):
        label, must_refuse, mutate = rng.choice(muts)
        d = root / f"m{i}"
        shutil.copytree(good, d)
        must_refuse = bool(mutate(d, rng)) or must_refuse
        before = _tree(registry_root)
        published = _attempt(report, f"publish ({label})", lambda: registry.publish(d, f"fuzz{i % 7}"))
        if published:
            report.accepted += 1
            if must_refuse:
                report.accepted_bad += 1
                report.note(f"accepted bad adapter ({label})")
        elif published is False and _tree(registry_root) != before:
            report.wrote_on_refusal += 1
            report.note(f"refused publish wrote to the registry ({label})")
        # the server loads disk-tier dirs with its own loader: it must refuse cleanly too
        _attempt(report, f"server loader ({label})", lambda: server_loader(d), count_refused=False)
        shutil.rmtree(d, ignore_errors=True)
    for _ in range(max(1, n // 10)):
        text = hostile_strings(rng)
        for op in (lambda: registry.publish(good, text), lambda: registry.resolve(text),
                   lambda: registry.pull(text, root / "pulled"), lambda: registry.promote("fuzz0", 1, text),
                   lambda: registry.list_versions(text)):
            _attempt(report, f"name {text[:40]!r}", op)
            shutil.rmtree(root / "pulled", ignore_errors=True)
    tamper_manifests(registry, registry_root, root, rng, report, max(1, n // 20))
    return report


def _attempt(report: RegistryFuzzReport, what: str, op: Callable[[], Any], count_refused: bool = True) -> bool | None:
    """One input: True when ``op`` succeeded, False when refused with an AdapterctlError,
    None when it raised anything else (a crash, noted)."""
    report.inputs += 1
    try:
        op()
        return True
    except AdapterctlError:
        report.refused += count_refused
        return False
    except Exception as exc:  # noqa: BLE001 - the finding: anything but a clean refusal
        report.crashes += 1
        report.note(f"{what}: {type(exc).__name__}: {exc}")
        return None


def tamper_manifests(registry: Any, registry_root: Path, root: Path, rng: random.Random, report: RegistryFuzzReport,
                     n: int) -> None:
    """Rewrite a published manifest with wrong digests / sizes / paths; pull must refuse."""
    m = registry.publish(root / "good", "tampered")
    path = registry_root / "adapters" / "tampered" / "versions" / f"{m.version:09d}.json"
    original = path.read_text()
    for _ in range(n):
        data = json.loads(original)
        f = rng.choice(data["files"])
        pick = rng.randrange(6)
        if pick == 0:
            f["digest"] = "sha256:" + "%064x" % rng.randrange(2**256)
        elif pick == 1:
            f["size"] = rng.choice((0, -1, f["size"] + 1, 2**63))
        elif pick == 2:
            f["path"] = rng.choice(("../escape", "/abs", "a/../../b", "", "\x00"))
        elif pick == 3:
            data["files"].append(dict(f))
        elif pick == 4:
            data["format"] = "adapterctl.manifest/v9"
        else:
            data = rng.choice(([], None, "x"))
        path.write_text(json.dumps(data))
        if _attempt(
            report, f"tampered manifest {pick}", lambda: registry.pull(f"tampered:{m.version}", root / "tpull")
        ):
            report.accepted_bad += 1
            report.note(f"pulled a tampered manifest (variant {pick})")
        shutil.rmtree(root / "tpull", ignore_errors=True)
    path.write_text(original)
