"""``python3 -m bench.device_check pack|run``: issue 10's CUDA check as one prepared command for
a lent GPU machine (the ``device`` tool). That machine's image has torch, transformers, peft
and pytest, but neither adapterctl (not installed) nor the converted Gemma 3 270M (1 GB; a
call carries at most 64 MiB) nor a network.

``pack DIR [--wheels]`` (here, once): the default base's config, generation config, tokenizer
  config, chat template and tokenizer.json (gzipped, ~5 MB) into DIR (``.devcache``: git-ignored);
  ``--wheels`` adds DIR/wheels (~36 MB): WHEELS for CPython 3.12, what p4 and p5 need there.
``run --pack DIR --out OUT`` (there, carrying DIR):
  1. installs DIR/wheels, if any, into a temp folder and maps this checkout onto ``adapterctl.*``
     with links in the same folder (setup.py's ROOTS);
  2. builds the tests' tiny model into the test cache and a random-weight model of Gemma 3
     270M's shape (bench/random_base.py): the tokenizer is the real one, the weights are not;
  3. runs the engine tests of PARITY with ``ADAPTERCTL_TEST_DEVICE`` set (fp32 parity, bf16
     >= 90 %, prefix-cache identity, paged LoRA banks on the ATen path, requests, admin, fairness);
  4. runs ``python -m bench.run --device DEVICE --only BENCH`` on the random-weight model with
     ``ADAPTERCTL_BASE_MODEL`` pointing at it, then (with the wheels) ``--only p4,p5`` as a second
     run. Rates and ratios there are the engine's speed, which does not depend on weight values
     (greedy, ``ignore_eos``); p6 trains (not the serving path).
  Each step is bounded in time; logs go to OUT. ``--device cpu`` rehearses it on a CPU.
"""
from __future__ import annotations

import argparse
import ast
import gzip
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja")
PARITY = ("test_engine_parity.py", "test_engine_bf16_parity.py", "test_prefix_cache.py", "test_paged_slots.py",
          "test_engine_requests.py", "test_engine_admin.py", "test_engine_fairness.py")
BENCH = "p1,p2,b64,p3,p8,roof"
WITH_WHEELS = "p4,p5"  # bench.run workloads that need the carried wheels (FastAPI, moto)
# What the GPU image lacks for the front ends (p4) and the S3 registry (p5), with their needs
# that it lacks too; ``wheels`` fetches each at the version installed where it runs.
WHEELS = ("fastapi", "starlette", "uvicorn", "sse-starlette", "pydantic", "pydantic-core", "annotated-types",
          "typing-inspection", "opentelemetry-api", "grpcio-health-checking",
          "grpcio-reflection", "protobuf", "llguidance", "boto3", "botocore", "s3transfer", "jmespath", "moto",
          "responses", "xmltodict", "flask", "flask-cors", "blinker", "itsdangerous", "cryptography", "cffi",
          "pycparser")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_24_x86_64")


def pack(out: Path) -> Path:
    """Copy the default base's small files into ``out`` (tokenizer.json gzipped)."""
    from adapterctl.basemodel import resolve_base_model

    base = resolve_base_model(None, progress=True).path
    out.mkdir(parents=True, exist_ok=True)
    for name in BASE_FILES:
        shutil.copyfile(base / name, out / name)
    with open(base / "tokenizer.json", "rb") as src, gzip.open(out / "tokenizer.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def wheels(out: Path, python: str = "3.12") -> Path:
    """Download WHEELS (the versions installed here) for CPython ``python`` on x86-64 Linux into ``out``."""
    from importlib.metadata import version

    out.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", *platforms, "-d", str(out), *pins],
                   check=True)
    return out


def unpack(packed: Path, out: Path) -> Path:
    """The inverse of :func:`pack`: a directory the tokenizer and the config load from."""
    out.mkdir(parents=True, exist_ok=True)
    for name in BASE_FILES:
        shutil.copyfile(packed / name, out / name)
    with gzip.open(packed / "tokenizer.json.gz", "rb") as src, open(out / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def namespace(site: Path) -> Path:
    """Links under ``site``/adapterctl mapping this checkout's folders onto ``adapterctl.*``, as
    setup.py's ROOTS does for an install (read from setup.py, not repeated here)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    roots = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "ROOTS")
    pkg = site / "adapterctl"
    if pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for entry in (REPO / roots["adapterctl"]).iterdir():  # the top package's own modules
        if entry.name == "__pycache__":
            continue
        (pkg / entry.name).symlink_to(entry)
    for name, folder in roots.items():
        if name != "adapterctl":
            (pkg / name.split(".", 1)[1]).symlink_to(REPO / folder, target_is_directory=True)
    return site


def models(base_files: Path, work: Path) -> None:
    """Step 2: the tests' tiny model into WORK's test cache and the random-weight Gemma 3 270M
    shape into WORK/gemma-random, both with the tokenizer of ``base_files`` (an unpacked pack)."""
    from bench import random_base

    random_base.build(work / "test-cache" / "models" / "tiny-gemma3", base_files, random_base.tiny_config())
    random_base.build(work / "gemma-random", base_files, random_base.like(base_files), scale=1.0)


def _step(name: str, cmd: list[str], env: dict[str, str], out: Path, timeout: int) -> int:
    """Run ``cmd`` from the repository root with its output teed to OUT/``name``.log; its exit code
    (124 when killed past ``timeout`` seconds)."""
    print(f"\n=== {name}: {' '.join(cmd)} (at most {timeout} s)", flush=True)
    started = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            rc = proc.wait()
        finally:
            watchdog.cancel()
    rc = 124 if rc < 0 and time.monotonic() - started >= timeout else rc
    print(f"=== {name}: exit {rc} after {time.monotonic() - started:.0f} s", flush=True)
    return rc


def run(packed: Path, out: Path, device: str, work: Path, parity_timeout: int, bench_timeout: int,
        bench: str = BENCH, quick: bool = False, parity: tuple[str, ...] = PARITY) -> int:
    """Steps 1-4 of the module docstring; 0 when every step exited 0."""
    out.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    carried = sorted((packed / "wheels").glob("*.whl"))
    if carried:  # into the same folder as the links; nothing of the image's is changed
        shutil.rmtree(site, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, carried)], check=True)
    namespace(site)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), PYTHONUNBUFFERED="1",
               ADAPTERCTL_HOME=str(work / "home"), ADAPTERCTL_TEST_CACHE=str(work / "test-cache"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    base_files = unpack(packed, work / "base-files")
    codes = {"environment": _step("environment", [sys.executable, "-c", (
        "import importlib.metadata as m, torch, adapterctl.server.engine.engine; "
        "print(*(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'peft', 'protobuf', 'grpcio')), sep=', '); "
        "print('cuda', torch.cuda.is_available(), torch.cuda.is_available() and torch.cuda.get_device_name())")],
        env, out, 120)}
    codes["models"] = _step("models", [sys.executable, "-m", "bench.device_check", "models", str(base_files),
                                       str(work)], env, out, 300)
    tests = [str(REPO / "tests" / "server" / "engine" / name) for name in parity]
    codes["parity"] = _step("parity", [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                       "-m", "not slow", *tests], dict(env, ADAPTERCTL_TEST_DEVICE=device),
                            out, parity_timeout)
    runs = {"bench": bench, **({"bench-wheels": WITH_WHEELS} if carried and bench == BENCH else {})}
    for name, only in runs.items():  # separate runs: a timeout in the second keeps the first's figures
        codes[name] = _step(name, [sys.executable, "-m", "bench.run", "--device", device, "--only", only,
                                   *(["--quick"] if quick else [])],
                            dict(env, ADAPTERCTL_BASE_MODEL=str(work / "gemma-random")), out, bench_timeout)
    print("\n" + "  ".join(f"{k}={v}" for k, v in codes.items()), flush=True)
    return 0 if not any(codes.values()) else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.device_check", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack", help="copy the base's config and tokenizer into DIR (here)")
    p.add_argument("dir", type=Path)
    p.add_argument("--wheels", action="store_true",
                   help="also DIR/wheels: what p4 and p5 need that the GPU image lacks (~30 MB, CPython 3.12)")
    m = sub.add_parser("models", help="run's step 2 alone: build the models from an unpacked base into WORK")
    m.add_argument("base_files", type=Path)
    m.add_argument("work", type=Path)
    r = sub.add_parser("run", help="the check itself (on the GPU machine)")
    r.add_argument("--pack", type=Path, default=REPO / ".devcache")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device-check-out")))
    r.add_argument("--device", default="cuda")
    r.add_argument("--work", type=Path, default=Path("/tmp/adapterctl-device-check"))
    r.add_argument("--parity-timeout", type=int, default=180)
    r.add_argument("--bench-timeout", type=int, default=240, help="seconds for each bench.run (default 240)")
    r.add_argument("--bench", default=BENCH, help=f"bench.run --only (default {BENCH})")
    r.add_argument("--quick", action="store_true", help="bench.run --quick (a rehearsal, says nothing of speed)")
    r.add_argument("--tests", default=",".join(PARITY), help="test files of tests/server/engine (default: PARITY)")
    args = parser.parse_args(argv)
    if args.verb == "pack":
        print(pack(args.dir))
        if args.wheels:
            print(wheels(args.dir / "wheels"))
        return
    if args.verb == "models":
        models(args.base_files, args.work)
        return
    if not (args.pack / "tokenizer.json.gz").is_file():
        parser.error(f"{args.pack}: no packed base (run `python -m bench.device_check pack {args.pack}` here first)")
    sys.exit(run(args.pack, args.out, args.device, args.work, args.parity_timeout, args.bench_timeout, args.bench,
                 args.quick, tuple(args.tests.split(","))))


if __name__ == "__main__":
    main()
