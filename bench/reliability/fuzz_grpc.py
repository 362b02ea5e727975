"""Seeded fuzzing of every RPC over gRPC on loopback: Inference (unary and streaming),
Admin, health, plus raw undecodable request bytes and hostile metadata.

Invariants checked per input: the status is one the API documents (never INTERNAL or
UNKNOWN), an OK answer is well formed, and the server process is alive at the end.
"""
from __future__ import annotations

import asyncio
import collections
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapterctl.v1 import adapterctl_pb2 as pb
from adapterctl.v1 import adapterctl_pb2_grpc as pb_grpc
from bench.reliability.common import ADMIN_TOKEN, INFER_TOKEN

S = grpc.StatusCode
# What the API documents for a hostile but authenticated client (README "status codes").
DOCUMENTED = {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED,
              S.UNAUTHENTICATED, S.PERMISSION_DENIED, S.DEADLINE_EXCEEDED, S.CANCELLED}
INT32 = (-2**31, -1, 0, 1, 2, 7, 2**31 - 1)
INT64 = (-2**63, -1, 0, 1, 42, 2**63 - 1)
FLOATS = (0.0, -0.0, 1e-30, 0.5, 0.7, 1.0, 1.5, 2.0, -1.0, 1e30, math.inf, -math.inf, math.nan, 3.4e38)
ROLES = ("system", "user", "assistant", "", "tool", "USER", "model", "\x00", "user\n")


def hostile_strings(rng: random.Random) -> str:
    pick = rng.randrange(14)
    if pick == 0:
        return ""
    if pick == 1:
        return "x" * 10_000
    if pick == 2:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 40)))
    if pick == 3:
        return "\x00" + "a" * rng.randrange(5)
    if pick == 4:
        return "../" * rng.randrange(1, 6) + "etc/passwd"
    if pick == 5:
        return "/abs/path"
    if pick == 6:
        return rng.choice(("🙂", "名字", "ﬁ", "e\u0301", "\u202e", "\ufeff"))
    if pick == 7:
        return "\r\n{\"status\": \"OK\"}\n"
    if pick == 8:
        return " " * rng.randrange(1, 5)
    if pick == 9:
        return "".join(chr(rng.randrange(0, 0x80)) for _ in range(rng.randrange(1, 30)))
    if pick == 10:
        return "%s%n%x{0}${x}"
    if pick == 11:
        return "a" * 129
    if pick == 12:
        return "\ud7ff\ue000\U0010ffff"
    return "".join(rng.choice("ab:@./_-") for _ in range(rng.randrange(1, 20)))


@dataclass
class FuzzTargets:
    """Valid pieces the generator mixes with hostile ones."""

    names: list[str]          # published adapter names
    digests: list[str]        # their manifest digests
    max_new_tokens_limit: int


def adapter_ref(rng: random.Random, t: FuzzTargets) -> str:
    name = rng.choice(t.names)
    choices: list[Callable[[], str]] = [
        lambda: "", lambda: name, lambda: f"{name}:1", lambda: f"{name}:latest", lambda: f"{name}:prod",
        lambda: f"{name}@{rng.choice(t.digests)}", lambda: f"{name}:{rng.choice(INT64)}",
        lambda: f"{name}@sha256:{'0' * 64}", lambda: f"{name}@sha256:{'Z' * 64}", lambda: f"{name}:",
        lambda: f"{name}::1", lambda: f"missing-{rng.randrange(99)}", lambda: f"{name}:1@{rng.choice(t.digests)}",
        lambda: hostile_strings(rng), lambda: name + hostile_strings(rng), lambda: f" {name} ",
        lambda: f"{name}:{hostile_strings(rng)}",
    ]
    return rng.choice(choices)()


def generate_request(rng: random.Random, t: FuzzTargets) -> pb.GenerateRequest:
    req = pb.GenerateRequest(adapter=adapter_ref(rng, t))
    shape = rng.randrange(10)
    if shape < 4:
        req.prompt = rng.choice(("Hello", "The movie was", "", "a" * rng.randrange(1, 3000))) if shape else \
            hostile_strings(rng)
    elif shape < 8:
        for _ in range(rng.choice((0, 1, 1, 2, 3, 40))):
            req.messages.add(role=rng.choice(ROLES), content=rng.choice(("hi", "", hostile_strings(rng))))
    elif shape == 8:
        req.prompt = "both"
        req.messages.add(role="user", content="both")
    # else: neither prompt nor messages
    if rng.random() < 0.7:
        req.max_new_tokens = rng.choice((*INT32, t.max_new_tokens_limit + 1))  # valid ones stay short
    if rng.random() < 0.5:
        req.temperature = rng.choice(FLOATS)
    if rng.random() < 0.4:
        req.top_p = rng.choice(FLOATS)
    if rng.random() < 0.4:
        req.top_k = rng.choice(INT32)
    if rng.random() < 0.4:
        req.seed = rng.choice(INT64)
    if rng.random() < 0.4:
        req.stop.extend(rng.choice(([], [""], ["\x00"], ["."], ["a"] * 100, ["x" * 10_000], [hostile_strings(rng)])))
    if rng.random() < 0.5:
        req.request_id = rng.choice(("r-1", hostile_strings(rng), "x" * 10_000, "\n\x1b[31mred"))
    return req


def call_metadata(rng: random.Random) -> tuple[tuple[str, str], ...]:
    pick = rng.random()
    if pick < 0.80:
        auth = (("authorization", f"Bearer {INFER_TOKEN}"),)
    elif pick < 0.85:
        auth = ()
    elif pick < 0.90:
        auth = (("authorization", rng.choice(("Bearer ", "Bearer wrong", "Basic x", "bearer " + INFER_TOKEN + "x",
                                              INFER_TOKEN, "Bearer " + "a" * 4000))),)
    else:
        auth = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    extra = ()
    if rng.random() < 0.1:
        extra = (("x-fuzz", rng.choice(("", "v" * 2000, "with spaces", "ascii"))), ("x-request-id", "r" * 100))
    return auth + extra


@dataclass
class FuzzReport:
    inputs: int = 0
    internal: int = 0           # INTERNAL or UNKNOWN answers
    undocumented: int = 0       # any other status outside DOCUMENTED
    malformed_ok: int = 0       # OK answers that break the response contract
    client_refused: int = 0     # not sent: the gRPC client library refused it (not counted in inputs)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)

    def record(self, what: str, code: grpc.StatusCode, detail: str = "") -> None:
        self.inputs += 1
        self.statuses[code.name] += 1
        bad = code in (S.INTERNAL, S.UNKNOWN)
        self.internal += bad
        self.undocumented += code not in DOCUMENTED and not bad
        if (bad or code not in DOCUMENTED) and len(self.examples) < 10:
            self.examples.append(f"{what}: {code.name} {detail[:200]}")


def _check_response(req: pb.GenerateRequest, resp: pb.GenerateResponse) -> bool:
    """An OK Generate answer names the adapter it was asked for and echoes the id."""
    if req.adapter.strip() and not (resp.adapter.name and resp.adapter.version >= 1 and resp.adapter.digest):
        return False
    if req.request_id and not resp.request_id:
        return False
    return resp.finish_reason != pb.FINISH_REASON_UNSPECIFIED


async def _one(channel: grpc.aio.Channel, rng: random.Random, t: FuzzTargets, report: FuzzReport) -> None:
    inference, admin = pb_grpc.InferenceStub(channel), pb_grpc.AdminStub(channel)
    md = call_metadata(rng)
    timeout = rng.choice((None, None, None, 0.001, 0.05, 1.0, 30.0)) or 60.0
    kind = rng.randrange(100)
    try:
        if kind < 45:
            req = generate_request(rng, t)
            resp = await inference.Generate(req, metadata=md, timeout=timeout)
            report.malformed_ok += not _check_response(req, resp)
            report.record("Generate", S.OK)
        elif kind < 75:
            req = generate_request(rng, t)
            call = inference.GenerateStream(req, metadata=md, timeout=timeout)
            cancel_after = rng.choice((None, None, 0, 1, 2))
            finals = seen = 0
            async for msg in call:
                seen += 1
                finals += msg.HasField("final")
                if cancel_after is not None and seen > cancel_after:
                    call.cancel()
                    break
            if cancel_after is None or seen <= cancel_after:
                report.malformed_ok += finals != 1
            report.record("GenerateStream", S.OK if not call.cancelled() else S.CANCELLED)
        elif kind < 90:
            method = rng.choice(("LoadAdapter", "UnloadAdapter", "PinAdapter", "UnpinAdapter", "ListAdapters",
                                 "RefreshAliases"))
            if method == "ListAdapters":
                req: Any = pb.ListAdaptersRequest(name=rng.choice((*t.names, "", hostile_strings(rng))))
            elif method == "RefreshAliases":
                req = pb.RefreshAliasesRequest()
            else:
                req = pb.AdapterRequest(adapter=adapter_ref(rng, t))
            await getattr(admin, method)(req, metadata=md, timeout=timeout)
            report.record(method, S.OK)
        elif kind < 95:
            service = rng.choice(("", "adapterctl.v1.Inference", "adapterctl.v1.Admin", hostile_strings(rng)))
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                            timeout=timeout)
            report.record("Health", S.OK)
        else:  # bytes that are not a valid GenerateRequest
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            method = rng.choice(("/adapterctl.v1.Inference/Generate", "/adapterctl.v1.Admin/LoadAdapter"))
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            await call(raw, metadata=md, timeout=timeout)
            report.record("raw " + method, S.OK)
    except grpc.aio.AioRpcError as exc:  # NOT_FOUND covers unknown health services (grpc.health.v1)
        report.record(f"kind {kind}", exc.code(), exc.details() or "")
    except (ValueError, TypeError, grpc._cython.cygrpc.ExecuteBatchError):  # the client refused to send it
        report.client_refused += 1


async def fuzz(address: str, targets: FuzzTargets, n: int, seed: int, concurrency: int = 16) -> FuzzReport:
    """``n`` seeded inputs, ``concurrency`` at a time."""
    report = FuzzReport()
    rng = random.Random(seed)
    seeds = [rng.randrange(2**63) for _ in range(n)]
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        queue = collections.deque(seeds)

        async def worker() -> None:
            while queue:
                await _one(channel, random.Random(queue.popleft()), targets, report)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return report
