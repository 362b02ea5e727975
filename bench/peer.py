"""``python -m bench.peer`` (``make bench-peer``): adapterctl's ``BatchingEngine`` against
vLLM's offline ``LLM`` with LoRA, the system a user would pick instead.

One workload for both, written once to a JSON file: the prepared Gemma 3 270M directory,
``--requests`` prompts of 16-32 token ids, ``--requests`` rank-16 q/v PEFT adapters from a
seeded random init (one per request, all resident), greedy with ``ignore_eos``. Each system
runs in its own process (``bench/peer_adapterctl.py`` in this venv, ``bench/peer_vllm.py``
in ``.venv-peer``), alternating adapterctl, vLLM, adapterctl, ... for ``--reps`` rounds per
dtype, each child under ``--timeout`` seconds, so a load burst on the shared host hits both.

``single_adapter`` is the single stream through the first adapter (an interactive user of one
fine-tune). Prints a table, then as the LAST line one JSON object:
``vs_vllm_{base,mixed,single,single_adapter}_{fp32,bf16}``
(median over rounds of adapterctl ÷ vLLM tokens/s, the two runs of a round adjacent in
time), the greedy-token agreement between the systems, and the CPU model and flags.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SYSTEMS = ("adapterctl", "vllm")
WORKLOADS = ("base", "mixed", "single", "single_adapter")
DTYPES = {"float32": "fp32", "bfloat16": "bf16"}
KEYS = ("vs_vllm_mixed_fp32", "vs_vllm_base_fp32", "vs_vllm_mixed_bf16", "vs_vllm_base_bf16", "vs_vllm_single_bf16")
ROOT = Path(__file__).resolve().parents[1]
# The ISA features that decide which kernels either system can use on a CPU.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
             "amx_tile")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare(root: Path, requests: int, new_tokens: int, single_new_tokens: int, rank: int = 16) -> Path:
    """Write the shared workload (prompts as token ids, adapter directories) under ``root``."""
    from adapterctl.basemodel import load_model, load_tokenizer
    from bench.common import base_model, prompts, random_adapters, template_adapter

    base = base_model()
    tok = load_tokenizer(base)
    model = load_model(base, device="cpu")
    template = template_adapter(model, root / "template", rank, ["q_proj", "v_proj"])
    dirs = random_adapters(template, root / "adapters", "a", requests, seed=1)
    del model
    workload = {"model": str(base.path), "prompts": prompts(tok, requests, 16, 32, seed=1),
                "single_prompt": prompts(tok, 1, 16, 32, seed=5)[0], "new_tokens": new_tokens,
                "single_new_tokens": single_new_tokens, "adapters": [str(d) for d in dirs], "max_lora_rank": rank,
                "max_model_len": 512, "max_batch_tokens": 2048}
    path = root / "workload.json"
    path.write_text(json.dumps(workload))
    return path


def vllm_env() -> dict[str, str]:
    """vLLM on every CPU this process may use, none reserved, 4 GiB of KV cache."""
    cpus = sorted(os.sched_getaffinity(0))
    bind = f"{cpus[0]}-{cpus[-1]}" if cpus == list(range(cpus[0], cpus[-1] + 1)) else ",".join(map(str, cpus))
    return {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def child(system: str, peer_python: str, workload: Path, dtype: str, out: Path, timeout: float,
          log: Path) -> dict[str, Any]:
    """Run one system's process; its result dict, or ``{"error": one line}``."""
    if system == "vllm":
        cmd, env = [peer_python, str(ROOT / "bench" / "peer_vllm.py")], vllm_env()
    else:
        cmd, env = [sys.executable, "-m", "bench.peer_adapterctl"], {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd += ["--workload", str(workload), "--dtype", dtype, "--out", str(out)]
    began = time.monotonic()
    with log.open("w") as fh:
        # Its own session, so a timeout ends vLLM's engine-core and worker processes too.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"error": f"timed out after {timeout:.0f} s (log {log})"}
    if returncode != 0 or not out.is_file():
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or ["(no output)"]
        return {"error": f"exit {returncode}: {tail[0][:300]} (log {log})"}
    result = json.loads(out.read_text())
    result["wall_s"] = time.monotonic() - began
    return result


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """Greedy agreement of two systems' outputs for the same requests: the share of
    requests whose tokens are identical, and the mean length of the common prefix as a
    share of the longer output (1.0 both when everything matches)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same non-zero number of outputs, got {len(a)} and {len(b)}")
    identical = sum(x == y for x, y in zip(a, b)) / len(a)
    prefixes = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefixes.append(n / max(len(x), len(y), 1))
    return {"identical": identical, "prefix": statistics.mean(prefixes)}


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios, rates and agreement from per-child results.

    Each item has ``system``, ``dtype``, ``round`` and either ``runs`` (workload ->
    ``tok_s``, ``tokens``) or ``error``. ``vs_vllm_<workload>_<dtype>`` is the median over
    rounds where both systems finished of adapterctl ÷ vLLM tokens/s (None, with the reason
    under ``skipped``, where no round did). Agreement compares the first finished run of each.
    """
    out: dict[str, Any] = {"tok_s": {}, "agreement": {}, "skipped": {}}
    ok = [r for r in results if "runs" in r]
    for dtype, short in DTYPES.items():
        for workload in WORKLOADS:
            key = f"{workload}_{short}"
            rate = {s: {r["round"]: r["runs"][workload]["tok_s"] for r in ok
                        if r["system"] == s and r["dtype"] == dtype and workload in r["runs"]} for s in SYSTEMS}
            rounds = sorted(set(rate["adapterctl"]) & set(rate["vllm"]))
            ratios = [rate["adapterctl"][i] / rate["vllm"][i] for i in rounds]
            out[f"vs_vllm_{key}"] = statistics.median(ratios) if ratios else None
            out["tok_s"][key] = {s: sorted(rate[s].values()) for s in SYSTEMS}
            if rounds:
                first = {s: next(r for r in ok if r["system"] == s and r["dtype"] == dtype and workload in r["runs"])
                         for s in SYSTEMS}
                out["agreement"][key] = agreement(first["adapterctl"]["runs"][workload]["tokens"],
                                                  first["vllm"]["runs"][workload]["tokens"])
            else:
                errors = sorted({f"{r['system']}: {r['error']}" for r in results
                                 if r["dtype"] == dtype and "error" in r})
                out["skipped"][key] = "; ".join(errors) or "not run"
    return out


def cpu_info() -> dict[str, Any]:
    """lscpu's model name and flags (``/proc/cpuinfo`` where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = (fields.get("flags") or "").split()
    return {"cpu_model": fields.get("model name", "unknown"), "cpus": os.cpu_count(),
            "cpu_isa": [f for f in ISA_FLAGS if f in flags], "cpu_flags": " ".join(flags)}


def table(summary: dict[str, Any]) -> str:
    lines = [f"{'workload':<14}{'adapterctl tok/s':>26}{'vLLM tok/s':>26}{'ratio':>8}  agreement (identical/prefix)",
             "-" * 110]
    for short in DTYPES.values():
        for workload in WORKLOADS:
            key = f"{workload}_{short}"
            rates = summary["tok_s"].get(key, {})
            shown = {s: " ".join(f"{v:.1f}" for v in rates.get(s, [])) or "-" for s in SYSTEMS}
            ratio = summary.get(f"vs_vllm_{key}")
            agree = summary["agreement"].get(key)
            lines.append(f"{key:<14}{shown['adapterctl']:>26}{shown['vllm']:>26}"
                         f"{'-' if ratio is None else f'{ratio:.3f}':>8}  "
                         + (f"{agree['identical']:.3f} / {agree['prefix']:.3f}" if agree else
                            summary["skipped"].get(key, "")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default=str(ROOT / ".venv-peer" / "bin" / "python"),
                        help="python of the venv with vllm-cpu (make peer-venv)")
    parser.add_argument("--reps", type=int, default=3, help="rounds per dtype, each system once a round")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated subset of float32,bfloat16")
    parser.add_argument("--timeout", type=float, default=900, help="seconds each child process may take")
    parser.add_argument("--budget", type=float, default=5400,
                        help="seconds after which no further child is started (the run so far is reported)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--single-new-tokens", type=int, default=64)
    parser.add_argument("--keep", type=Path, help="keep the workload, results and child logs in this directory")
    parser.add_argument("--summarize", type=Path, metavar="RESULTS_JSON",
                        help="only print the summary of a kept results.json (e.g. of an interrupted run)")
    args = parser.parse_args(argv)
    if args.summarize:
        results = json.loads(args.summarize.read_text())
        report(results, max(r["round"] for r in results) + 1, time.monotonic())
        return
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= set(DTYPES) or args.reps < 1:
        parser.error("--dtypes takes a subset of float32,bfloat16 and --reps must be >= 1")
    if not Path(args.peer_python).is_file():
        parser.error(f"{args.peer_python} not found: build the vLLM venv with `make peer-venv`")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        workload = prepare(root, args.requests, args.new_tokens, args.single_new_tokens)
        _log(f"workload ready: {workload}")
        results: list[dict[str, Any]] = []
        failed: set[tuple[str, str]] = set()
        for dtype in dtypes:  # every fp32 round first: a slow bf16 cannot starve them of --budget
            for rnd in range(args.reps):
                for system in SYSTEMS:
                    name = f"{system}-{dtype}-{rnd}"
                    if (system, dtype) in failed:
                        continue
                    if time.monotonic() - started > args.budget:
                        res = {"error": f"not started: the --budget of {args.budget:.0f} s was spent"}
                    else:
                        res = child(system, args.peer_python, workload, dtype, root / f"{name}.json", args.timeout,
                                    root / f"{name}.log")
                    res.update(system=system, dtype=dtype, round=rnd)
                    if "error" in res:
                        if "timed out" not in res["error"]:  # a crash repeats; a slow host may not
                            failed.add((system, dtype))
                        _log(f"{name}: {res['error']}")
                    else:
                        _log(f"{name}: " + ", ".join(f"{k} {v['tok_s']:.1f}" for k, v in res["runs"].items())
                             + f" tok/s ({res['wall_s']:.0f} s)")
                    results.append(res)
                    (root / "results.json").write_text(json.dumps(results))  # partial results survive a kill
    report(results, args.reps, started)


def report(results: list[dict[str, Any]], reps: int, started: float) -> None:
    """Print the table, then the JSON line."""
    summary = summarize(results)
    print(table(summary))
    last = {k: summary[k] for k in KEYS}
    last.update({k: v for k, v in summary.items() if k.startswith("vs_vllm_") and k not in KEYS})
    last.update(agreement=summary["agreement"], skipped=summary["skipped"], reps=reps,
                vllm=next((r["version"] for r in results if r["system"] == "vllm" and "version" in r), None),
                wall_s=time.monotonic() - started, **cpu_info())
    print(json.dumps(last))


if __name__ == "__main__":
    main()
