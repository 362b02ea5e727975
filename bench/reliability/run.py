"""``python -m bench.reliability.run [--quick]``: fuzzing, the soak and the fault drills
(issue 12) on real parts; a log on stderr, then as the LAST stdout line one JSON object
of figures (keys in FIGURES). Exit status 0 only when every goal is met.

Full run (93 min measured on a 2-core AMD EPYC, the soak 67 of them):
>= 10,000 fuzz inputs, a 10,000-request soak over 200 adapters on the real Gemma 3 270M,
every drill, 50 publish kills. ``--quick`` (~2 min)
uses small counts and is what ``tests/reliability`` runs (with the tiny model).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FIGURES = ("fuzz_inputs", "fuzz_crashes", "fuzz_internal", "soak_requests", "soak_wrong_or_lost", "soak_rss_growth",
           "drills_passed", "drills_total", "publish_kills", "partial_versions_seen")
GRACE = 20.0  # the shared server's --shutdown-grace
GOALS = {"fuzz_crashes": "== 0", "fuzz_internal": "== 0", "soak_wrong_or_lost": "== 0", "soak_rss_growth": "< 0.10",
         "drills_passed": "== drills_total", "partial_versions_seen": "== 0"}


@dataclass
class Budget:
    """How much of each part one run does."""

    fuzz_grpc: int
    fuzz_http: int
    fuzz_registry: int
    fuzz_jsonl: int
    huge_line_mb: int
    soak_requests: int
    soak_adapters: int
    soak_warmup: int
    publish_kills: int
    hostile_rss: int
    soak_prompts: int = 3


QUICK = Budget(fuzz_grpc=600, fuzz_http=200, fuzz_registry=60, fuzz_jsonl=300, huge_line_mb=16, soak_requests=300,
               soak_adapters=20, soak_warmup=50, publish_kills=5, hostile_rss=48)
FULL = Budget(fuzz_grpc=7000, fuzz_http=3000, fuzz_registry=1000, fuzz_jsonl=2000, huge_line_mb=100,
              soak_requests=10_000, soak_adapters=200, soak_warmup=1000, publish_kills=50, hostile_rss=300)


def _home(tmp: Path) -> None:
    """A private ADAPTERCTL_HOME (registry, caches) sharing the converted base models."""
    from adapterctl.home import home

    models = home() / "models"
    models.mkdir(parents=True, exist_ok=True)
    (tmp / "home").mkdir()
    (tmp / "home" / "models").symlink_to(models.resolve(), target_is_directory=True)
    os.environ["ADAPTERCTL_HOME"] = str(tmp / "home")
    os.environ.pop("ADAPTERCTL_REGISTRY", None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_server(ctx: dict[str, Any]):
    """The server the fuzzing, the soak and the drills run against: default limits (so the
    RSS reproduction is the issue's), registry through the fault proxy, 20 s grace."""
    from bench.reliability.common import ServerProc

    return ServerProc(ctx["tmp"] / "server", ctx["uri"], ctx["base_arg"],
                      options=dict(default_max_new_tokens=8, max_running_requests=32, max_adapters=16,
                                   alias_refresh=1, shutdown_grace=GRACE),
                      env={"AWS_ENDPOINT_URL": ctx["proxy"].endpoint})


async def part_fuzz_servers(ctx: dict[str, Any], b: Budget, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The RSS reproduction, then the gRPC fuzz, then the HTTP fuzz on the shared server;
    the greedy probes before the first and after the last (``greedy_unchanged``, ``alive``
    in the gRPC detail cover both fuzzers)."""
    from bench.reliability.common import Probe, greedy, health_status, log
    from bench.reliability.fuzz_grpc import FuzzTargets, fuzz
    from bench.reliability.rss import hostile_rss

    server, names = ctx["server"], ctx["names"][:8]
    probes = [Probe("", "The movie was", 8), Probe(f"{names[0]}:1", "Hello", 8), Probe(names[1], "A story", 6)]
    before = await greedy(server.address, probes)
    began = time.monotonic()
    rss = await hostile_rss(server, names[0], b.hostile_rss, seed, limit=1024)
    log(f"hostile RSS: {rss.requests} requests in {time.monotonic() - began:.0f}s: start {rss.rss_start_mib} MiB, "
        f"peak {rss.rss_peak_mib} MiB, idle {rss.rss_idle_mib} MiB; {rss.kv_log_lines[-2:]}")
    targets = FuzzTargets(names, [ctx["digests"][n] for n in names], 1024)
    began = time.monotonic()
    report = await fuzz(server.address, targets, b.fuzz_grpc, seed)
    grpc_seconds = time.monotonic() - began
    log(f"fuzz gRPC: {report.inputs} inputs in {grpc_seconds:.0f}s, statuses {dict(report.statuses)}")
    http = await part_fuzz_http(ctx, targets, b, seed)
    alive = server.alive() and await health_status(server.address) == "SERVING"
    after = await greedy(server.address, probes) if alive else []
    grpc_detail = {"inputs": report.inputs, "internal": report.internal, "undocumented": report.undocumented,
                   "malformed_ok": report.malformed_ok, "client_refused": report.client_refused,
                   "statuses": dict(report.statuses), "alive": alive, "greedy_unchanged": after == before,
                   "seconds": round(grpc_seconds, 1), "examples": report.examples,
                   "hostile_rss": {**asdict(rss), "idle_growth": round(rss.idle_growth, 4)}}
    return grpc_detail, http


async def part_fuzz_http(ctx: dict[str, Any], targets: Any, b: Budget, seed: int) -> dict[str, Any]:
    """The HTTP fuzz; ``alive``: the process runs, gRPC health is SERVING and ``GET /v1/models`` answers 200."""
    import httpx

    from bench.reliability.common import INFER_TOKEN, health_status, log
    from bench.reliability.fuzz_http import fuzz_http

    server, began = ctx["server"], time.monotonic()
    report = await fuzz_http(server.http_url, targets, b.fuzz_http, seed + 1)
    log(f"fuzz HTTP: {report.inputs} inputs in {time.monotonic() - began:.0f}s, statuses {dict(report.statuses)}, "
        f"{report.client_timeouts} client timeouts, {report.abandoned} streams abandoned")
    alive = server.alive() and await health_status(server.address) == "SERVING"
    if alive:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as client:
            r = await client.get("/v1/models", headers={"authorization": f"Bearer {INFER_TOKEN}"})
            alive = r.status_code == 200
    return {**{k: v for k, v in asdict(report).items() if k != "statuses"}, "statuses": dict(report.statuses),
            "findings": report.findings, "alive": alive, "seconds": round(time.monotonic() - began, 1)}


async def part_soak(ctx: dict[str, Any], b: Budget, seed: int) -> dict[str, Any]:
    from bench.reliability.common import prompt_texts
    from bench.reliability.soak import SoakPlan, soak

    server = ctx["server"]
    plan = SoakPlan(
        ctx["names"][: b.soak_adapters], ctx["digests"], prompt_texts(b.soak_prompts, seed), (8,), b.soak_requests, seed
    )
    report = await soak(server, plan, warmup=b.soak_warmup)
    return {
        "requests": report.requests,
        "completed": report.completed,
        "wrong_or_lost": report.wrong_or_lost,
        "statuses": dict(report.statuses),
        "rss_warm_mib": report.rss_warm >> 20,
        "rss_end_mib": report.rss_end >> 20,
        "rss_peak_mib": report.rss_peak >> 20,
        "rss_growth": round(report.rss_growth, 4),
        "seconds": round(report.seconds, 1),
        "examples": report.examples,
        "metrics": server.metrics_text(),
    }


def part_fuzz_files(ctx: dict[str, Any], b: Budget, seed: int) -> dict[str, Any]:
    from adapterctl.registry import open_registry
    from adapterctl.server.cache.loaded import load_peft_dir
    from bench.reliability.fuzz_jsonl import fuzz_jsonl
    from bench.reliability.fuzz_registry import fuzz_registry

    root = ctx["tmp"] / "fuzz-registry"
    (root / "store").mkdir(parents=True)
    reg = open_registry(f"file://{root / 'store'}")
    rep = fuzz_registry(reg, root / "store", ctx["base"], lambda d: load_peft_dir(d, ctx["base"], 64), root / "work",
                        b.fuzz_registry, seed)
    jl = fuzz_jsonl(ctx["tmp"] / "fuzz-jsonl", b.fuzz_jsonl, seed, b.huge_line_mb)
    return {"registry": asdict(rep), "jsonl": asdict(jl)}


async def part_drills(ctx: dict[str, Any]) -> list[tuple[str, bool, str]]:
    import boto3

    from bench.reliability.drills import DrillEnv, run_drills

    s3 = boto3.client("s3", endpoint_url=ctx["moto"].endpoint, region_name="us-east-1")
    env = DrillEnv(ctx["server"], ctx["proxy"], ctx["registry"], s3, ctx["bucket"], "adapters", ctx["base"],
                   ctx["tmp"] / "drill-adapters")
    return await run_drills(env, GRACE)


def secrets_leaked(ctx: dict[str, Any], extra_text: str) -> int:
    """Lines of any server log, or the metrics text, that contain a token of this run."""
    from bench.reliability.common import ADMIN_TOKEN, INFER_TOKEN

    lines = ctx["server"].log_path.read_text().splitlines()
    lines += extra_text.splitlines()
    return sum(INFER_TOKEN in line or ADMIN_TOKEN in line for line in lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from adapterctl.basemodel import resolve_base_model
    from adapterctl.registry import open_registry
    from bench.reliability.common import MotoS3, log, publish_many
    from bench.reliability.faultproxy import FaultProxy
    from bench.reliability.publish_kill import run_publish_kills

    b = dataclasses.replace(QUICK if args.quick else FULL)
    for key in ("fuzz_grpc", "fuzz_http", "soak_requests", "publish_kills"):
        if getattr(args, key) is not None:
            setattr(b, key, getattr(args, key))
    for item in args.set or ():
        key, _, value = item.partition("=")
        if key not in Budget.__dataclass_fields__:
            raise SystemExit(f"--set {item}: no budget field {key!r} (one of {', '.join(Budget.__dataclass_fields__)})")
        setattr(b, key, int(value))
    began = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="reliability-"))
    base = resolve_base_model(args.base_model, progress=False)
    _home(tmp)
    moto = MotoS3()
    bucket = moto.bucket()
    uri = f"s3://{bucket}/adapters"
    os.environ["AWS_ENDPOINT_URL"] = moto.endpoint  # the harness itself talks to moto directly
    proxy = FaultProxy(moto.port, seed=args.seed)
    registry = open_registry(uri)
    names = [f"a{i}" for i in range(max(b.soak_adapters, 8))]
    digests = publish_many(registry, base, tmp / "adapters", names, args.seed)
    log(f"published {len(names)} adapters to {uri} in {time.monotonic() - began:.0f}s")
    ctx = dict(tmp=tmp, base=base, base_arg=str(base.path), moto=moto, proxy=proxy, registry=registry, uri=uri,
               bucket=bucket, names=names, digests=digests)
    ctx["server"] = shared_server(ctx)
    detail: dict[str, Any] = {"budget": asdict(b), "base_model": base.id}
    try:
        detail["fuzz_files"] = part_fuzz_files(ctx, b, args.seed)
        log(
            "fuzz files: "
            + json.dumps({k: {x: v[x] for x in ("inputs", "crashes")} for k, v in detail["fuzz_files"].items()})
        )
        ctx["server"].start()
        detail["fuzz_grpc"], detail["fuzz_http"] = await part_fuzz_servers(ctx, b, args.seed)
        soak_detail = await part_soak(ctx, b, args.seed)
        metrics = soak_detail.pop("metrics")
        detail["soak"] = soak_detail
        log(f"soak: {json.dumps({k: v for k, v in soak_detail.items() if k != 'examples'})}")
        drills = await part_drills(ctx)
        detail["drills"] = [{"name": n, "passed": p, "detail": d} for n, p, d in drills]
        kills = run_publish_kills(registry, uri, base, tmp / "kills", b.publish_kills, args.seed)
        detail["publish_kill"] = asdict(kills)
        detail["secret_lines_in_logs_or_metrics"] = secrets_leaked(ctx, metrics)
    finally:
        ctx["server"].stop()
        proxy.close()
        moto.close()
    fg, fh, ff, soak_d = detail["fuzz_grpc"], detail["fuzz_http"], detail["fuzz_files"], detail["soak"]
    drills_passed = sum(d["passed"] for d in detail["drills"])
    # A kill drill failing its own checks (next number, gc) counts as a failed drill too.
    kill_ok = kills.next_version_ok and kills.orphans_left == 0 and kills.partial_versions_seen == 0
    figures = {
        "fuzz_inputs": fg["inputs"] + fh["inputs"] + ff["registry"]["inputs"] + ff["jsonl"]["inputs"],
        "fuzz_crashes": int(not fg["alive"]) + int(not fh["alive"]) + ff["registry"]["crashes"]
        + ff["jsonl"]["crashes"]
        + ff["registry"]["accepted_bad"] + ff["registry"]["wrote_on_refusal"] + int(not fg["greedy_unchanged"]),
        "fuzz_internal": fg["internal"] + fg["undocumented"] + fg["malformed_ok"] + fh["findings"],
        "soak_requests": soak_d["requests"],
        "soak_wrong_or_lost": soak_d["wrong_or_lost"],
        "soak_rss_growth": soak_d["rss_growth"],
        "drills_passed": drills_passed + kill_ok + (detail["secret_lines_in_logs_or_metrics"] == 0),
        "drills_total": len(detail["drills"]) + 2,
        "publish_kills": kills.kills,
        "partial_versions_seen": kills.partial_versions_seen,
    }
    detail["seconds"] = round(time.monotonic() - began, 1)
    return {"figures": figures, "detail": detail}


def goals_met(f: dict[str, Any]) -> bool:
    return (f["fuzz_crashes"] == 0 and f["fuzz_internal"] == 0 and f["soak_wrong_or_lost"] == 0
            and f["soak_rss_growth"] < 0.10 and f["drills_passed"] == f["drills_total"]
            and f["partial_versions_seen"] == 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (~2 min), for make test")
    parser.add_argument("--base-model", default=os.environ.get("ADAPTERCTL_BASE_MODEL"),
                        help="base model (default gemma-3-270m)")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--fuzz-grpc", type=int, help="override the gRPC fuzz count")
    parser.add_argument("--fuzz-http", type=int, help="override the HTTP fuzz count")
    parser.add_argument("--soak-requests", type=int, help="override the soak request count")
    parser.add_argument("--publish-kills", type=int, help="override the number of publish kills")
    parser.add_argument("--set", action="append", metavar="FIELD=N",
                        help="override any budget field (e.g. soak_adapters=50); repeatable")
    parser.add_argument("--detail", type=Path, help="write the full report (JSON) here")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(main_async(args))
    if args.detail:
        args.detail.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result["figures"][k] for k in FIGURES}), flush=True)
    return 0 if goals_met(result["figures"]) else 1


if __name__ == "__main__":
    sys.exit(main())
