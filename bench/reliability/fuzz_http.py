"""Seeded fuzzing of the OpenAI-compatible HTTP API over loopback (httpx): every body
field of ``POST /v1/completions`` and ``/v1/chat/completions``, ``GET /v1/models``,
unknown paths and methods, undecodable bodies, wrong content types, oversized bodies,
hostile headers, and streams the client abandons.

Invariants checked per input: the status is one the README's HTTP table documents (a 5xx
other than 503 / 504 is a finding), every error body is OpenAI's error JSON, a 200 keeps
the contract (choices present, one per prompt and choice; a stream ends with
``data: [DONE]``), the server never drops a connection without an answer.
"""
from __future__ import annotations

import asyncio
import collections
import json
import random
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.reliability.common import ADMIN_TOKEN, INFER_TOKEN
from bench.reliability.fuzz_grpc import FLOATS, INT32, INT64, ROLES, FuzzTargets, adapter_ref, hostile_strings

# README "status codes", HTTP table; 404/405 also for unknown paths and methods (Starlette's routing).
DOCUMENTED = {200, 400, 401, 403, 404, 405, 412, 429, 503, 504}
NUMBERS = (*INT32, *INT64, *FLOATS, 2**64, -2**64, 2**200, 16, 17, 5, 6, 20, 21, True, "1", None, [], {"v": 1})
ROUTES = ("/v1/completions", "/v1/chat/completions")
EXTRA_PATHS = ("/", "/v1", "/v1/", "/v1/models/", "/v1/models/a0", "/v1/completions/", "/v1/embeddings",
               "/v1/../v1/models", "/%2e%2e/etc/passwd", "/v1/chat/completions%00", "/docs", "/openapi.json",
               "/metrics", "/health", "/" + "x" * 10_000)


@dataclass
class HttpInput:
    """One request to send: method, path, headers, raw body; ``body`` is the JSON object
    behind ``content`` when there is one (the contract check needs it)."""

    method: str
    path: str
    headers: dict[str, bytes]
    content: bytes | None = None
    body: dict[str, Any] | None = None
    abandon_after: int | None = None  # streamed lines read before the client walks away
    timeout: float = 60.0


def _number(rng: random.Random, valid: tuple[Any, ...], hostile: bool) -> Any:
    return rng.choice(NUMBERS) if hostile and rng.random() < 0.5 else rng.choice(valid)


def model_value(rng: random.Random, t: FuzzTargets, base_id: str) -> Any:
    pick = rng.random()
    if pick < 0.2:
        return base_id
    if pick < 0.9:
        return adapter_ref(rng, t)
    return rng.choice((None, 0, [], {}, [base_id], base_id + "\x00", base_id.upper()))


def prompt_value(rng: random.Random) -> Any:
    return rng.choice((
        lambda: "Hello", lambda: "The movie was", lambda: "", lambda: hostile_strings(rng),
        lambda: "a " * rng.randrange(1, 100_000), lambda: ["Hello", "A story"], lambda: [], lambda: [""],
        lambda: [hostile_strings(rng) for _ in range(rng.randrange(1, 4))], lambda: [1, 2, 3], lambda: [[1, 2], [3]],
        lambda: [["nested"]], lambda: {"text": "hi"}, lambda: None, lambda: 7, lambda: ["x"] * 40,
        lambda: ["ok", None], lambda: "\ud800",
    ))()


def _content(rng: random.Random) -> Any:
    return rng.choice((
        lambda: "hi", lambda: "", lambda: hostile_strings(rng), lambda: None, lambda: 5, lambda: {"text": "x"},
        lambda: [{"type": "text", "text": "hi"}], lambda: [{"type": "image_url", "image_url": {"url": "x"}}],
        lambda: [{"type": "text"}], lambda: [{"text": "no type"}], lambda: [], lambda: ["plain"],
        lambda: "a " * rng.randrange(1, 50_000),
    ))()


def messages_value(rng: random.Random) -> Any:
    pick = rng.random()
    if pick < 0.08:
        return rng.choice(([], None, "hi", {"role": "user", "content": "hi"}, [None], [[]], ["user"]))
    out = []
    for _ in range(rng.choice((1, 1, 2, 3, 40))):
        msg: dict[str, Any] = {}
        if rng.random() < 0.93:
            msg["role"] = rng.choice((*ROLES, "developer", "user", "user", 3, None, ["user"]))
        if rng.random() < 0.9:
            msg["content"] = _content(rng)
        if rng.random() < 0.05:
            msg[hostile_strings(rng) or "k"] = hostile_strings(rng)
        out.append(msg)
    return out


def stop_value(rng: random.Random) -> Any:
    return rng.choice((None, "", ".", "\x00", [], [""], ["."], ["a"] * 100, ["x" * 10_000], [hostile_strings(rng)],
                       [1], [None], {"s": "."}, 5, "\n"))


def schema_value(rng: random.Random) -> Any:
    deep: Any = {"type": "object"}
    for _ in range(rng.choice((3, 50, 300))):  # 600 levels: under the encoder's recursion limit
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    return rng.choice((
        {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}, {"type": "string"},
        {"type": "unknown-type"}, {"$ref": "#"}, {"$ref": "#/definitions/missing"}, {"type": "string", "pattern": "(["},
        {"enum": list(range(5000))}, {"type": "array", "minItems": 10**9}, {"type": "string", "maxLength": -1},
        {"oneOf": []}, {"not": {}}, {"type": ["string", "null"]}, deep, [], "schema", None, 3, {"": {"": {}}},
        {"type": "object", "additionalProperties": {"$ref": "#"}}, {"type": "number", "minimum": float("nan")},
    ))


def response_format_value(rng: random.Random) -> Any:
    kind = rng.choice(("text", "json_object", "json_schema", "json_schema", "xml", "", None, 1))
    out: dict[str, Any] = {"type": kind}
    if kind == "json_schema" or rng.random() < 0.2:
        out["json_schema"] = rng.choice(({"name": "r", "schema": schema_value(rng)}, {"schema": schema_value(rng)},
                                         {"name": hostile_strings(rng)}, schema_value(rng), None))
    return rng.choice((out, out, out, None, "json", []))


def body_value(rng: random.Random, t: FuzzTargets, base_id: str, chat: bool) -> dict[str, Any]:
    """One request body: a valid core, then each field at a valid or a hostile value (a
    half of the bodies keep every number and the model valid, so generation runs too)."""
    body: dict[str, Any] = {}
    hostile = rng.random() < 0.5
    if rng.random() < 0.95:
        body["model"] = model_value(rng, t, base_id) if hostile else rng.choice((base_id, *t.names, f"{t.names[0]}:1"))
    if chat:
        if rng.random() < 0.95:
            body["messages"] = messages_value(rng) if hostile else [{"role": "user", "content": "Hello"}]
        if rng.random() < 0.05:
            body["prompt"] = "both"
    else:
        if rng.random() < 0.95:
            body["prompt"] = prompt_value(rng) if hostile else rng.choice(("Hello", ["Hello", "A story"]))
        if rng.random() < 0.05:
            body["messages"] = [{"role": "user", "content": "both"}]
    numbers: dict[str, tuple[Any, ...]] = {
        "max_tokens": (1, 2, 4, 8, t.max_new_tokens_limit, t.max_new_tokens_limit + 1),
        "temperature": (0, 0.0, 0.7, 1.0, 2.0), "top_p": (0.5, 0.9, 1.0), "top_k": (0, 1, 5, 50),
        "n": (1, 1, 2, 3), "seed": (0, 1, 42, 2**63 - 1), "logprobs": (0, 1, 5) if not chat else (True, False),
        "top_logprobs": (0, 1, 5, 20), "max_completion_tokens": (1, 4, 8),
        "presence_penalty": (0.0, 1.0), "best_of": (1, 2),
    }
    for key, valid in numbers.items():
        if rng.random() < (0.7 if key == "max_tokens" else 0.3):
            body[key] = _number(rng, valid, hostile)
    if body.get("max_tokens") in (t.max_new_tokens_limit, None) and rng.random() < 0.9:
        body["max_tokens"] = rng.choice((1, 2, 4, 8))  # keep the valid ones short
    if rng.random() < 0.3:
        body["stop"] = stop_value(rng)
    if rng.random() < 0.35:
        body["stream"] = rng.choice((True, True, False, "yes", 1, None))
    if rng.random() < 0.15:
        body["stream_options"] = rng.choice(({"include_usage": True}, {"include_usage": "x"}, None, [], "u"))
    if rng.random() < 0.15:
        body["response_format"] = response_format_value(rng)
    if rng.random() < 0.15:
        body["user"] = rng.choice(("u1", hostile_strings(rng), "x" * 300, 7, None))
    if rng.random() < 0.1:
        body[rng.choice(("echo", "suffix", "tools", "functions", "logit_bias", hostile_strings(rng) or "k"))] = \
            rng.choice((True, "s", [{"type": "function"}], {"50256": -100}, None, 1))
    return body


def _auth(rng: random.Random) -> dict[str, bytes]:
    pick = rng.random()
    if pick < 0.80:
        return {"authorization": f"Bearer {INFER_TOKEN}".encode()}
    if pick < 0.85:
        return {}
    if pick < 0.93:
        return {"authorization": rng.choice((b"Bearer ", b"Bearer wrong", b"Basic eDp5", INFER_TOKEN.encode(),
                                             f"bearer {INFER_TOKEN}x".encode(), b"Bearer " + b"a" * 8000,
                                             "Bearer 名字".encode(), b"Bearer \xff\xfe", b"Bearer\t" + b"t" * 3))}
    return {"authorization": f"Bearer {ADMIN_TOKEN}".encode()}


def _headers(rng: random.Random) -> dict[str, bytes]:
    headers = {"content-type": b"application/json", **_auth(rng)}
    if rng.random() < 0.1:
        headers["content-type"] = rng.choice((b"text/plain", b"application/x-www-form-urlencoded", b"",
                                              b"application/json; charset=latin-1", b"multipart/form-data"))
    if rng.random() < 0.05:
        del headers["content-type"]
    if rng.random() < 0.15:
        headers["x-routing-key"] = rng.choice((b"k", b"x" * 300, "ключ".encode(), b"\xff", b""))
    if rng.random() < 0.15:
        headers["x-request-id"] = rng.choice((b"r-1", b"r" * 10_000, "ид".encode(), b"{}", b" "))
    if rng.random() < 0.15:
        headers["x-adapterctl-timeout"] = rng.choice((b"0", b"-1", b"NaN", b"inf", b"1e309", b"abc", b"0.001",
                                                      b"0.05", b"1", b"30", b"1e-300", b""))
    return headers


def http_input(rng: random.Random, t: FuzzTargets, base_id: str) -> HttpInput:
    headers = _headers(rng)
    timeout = rng.choice((0.05, 0.5, 5.0, 60.0, 60.0, 60.0))
    kind = rng.randrange(100)
    if kind < 80:  # a JSON body on one of the two generation routes
        chat = kind >= 40
        body = body_value(rng, t, base_id, chat)
        content = json.dumps(body).encode()  # NaN / Infinity as raw JSON tokens (allow_nan)
        if rng.random() < 0.03:  # oversized: a few MB of padding in an ignored field
            body["pad"] = "p" * (rng.choice((1, 4, 16)) << 20)
            content = json.dumps(body).encode()
        abandon = rng.choice((None, None, 0, 1, 3)) if body.get("stream") else None
        return HttpInput("POST", ROUTES[chat], headers, content, body, abandon, timeout)
    if kind < 88:  # bodies that are not a JSON object
        raw = rng.choice((b"", b"{", b"{\"model\": ", b"[]", b"\"s\"", b"1", b"null", b"true", b"{\"model\": \xff}",
                          b"\xff\xfe\x00{}", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))),
                          b"[" * 100_000, b"{\"a\":" * 50_000, b"{\"model\": \"a0\", \"model\": 3}",
                          "{\"model\": \"\ud800\"}".encode("utf-8", "surrogatepass"), b"NaN", b"{}"))
        return HttpInput("POST", rng.choice(ROUTES), headers, raw, timeout=timeout)
    if kind < 93:
        return HttpInput("GET", "/v1/models", headers, timeout=timeout)
    if kind < 97:
        return HttpInput(rng.choice(("GET", "POST", "PUT", "DELETE")), rng.choice(EXTRA_PATHS), headers,
                         b"{}", timeout=timeout)
    return HttpInput(rng.choice(("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE")),
                     rng.choice((*ROUTES, "/v1/models")), headers, b"{}", timeout=timeout)


@dataclass
class HttpFuzzReport:
    inputs: int = 0
    internal: int = 0         # a 5xx that is not documented (503 unavailable, 504 deadline)
    undocumented: int = 0     # any other status outside DOCUMENTED
    bad_error_body: int = 0   # an error whose body is not {"error": {"message": ...}}
    malformed_ok: int = 0     # a 200 breaking the contract
    dropped: int = 0          # the server closed the connection without an answer
    client_timeouts: int = 0  # the client's own short timeout (counted as inputs)
    abandoned: int = 0        # streams the client walked away from
    client_refused: int = 0   # not sent: httpx / h11 refused the request (not counted in inputs)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def findings(self) -> int:
        return self.internal + self.undocumented + self.bad_error_body + self.malformed_ok + self.dropped

    def finding(self, what: str, inp: HttpInput, detail: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(f"{what}: {inp.method} {inp.path[:60]} {(inp.content or b'')[:160]!r}: {detail[:300]}")


def _is_error_json(text: str) -> bool:
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("error"), dict) and isinstance(doc["error"].get("message"), str)


def _expected_choices(inp: HttpInput) -> int | None:
    body = inp.body or {}
    n = body.get("n", 1)
    if not isinstance(n, int):
        return None
    prompt = body.get("prompt")
    return n * (len(prompt) if inp.path == ROUTES[0] and isinstance(prompt, list) else 1)


def contract_breach(inp: HttpInput, path: str, doc: Any) -> str:
    """Why a 200 JSON answer to ``path`` (as sent: httpx folds ``..``) breaks the contract ("" when it keeps it)."""
    if not isinstance(doc, dict):
        return "not an object"
    if path == "/v1/models":
        data = doc.get("data")
        return "" if isinstance(data, list) and data and all("id" in m for m in data) else "no model list"
    choices = doc.get("choices")
    if not isinstance(choices, list) or not choices:
        return "no choices"
    if _expected_choices(inp) not in (None, len(choices)):
        return f"{len(choices)} choices, expected {_expected_choices(inp)}"
    chat = inp.path == ROUTES[1]
    for c in choices:
        text = (c.get("message") or {}).get("content") if chat else c.get("text")
        if not isinstance(text, str) or c.get("finish_reason") not in ("stop", "length"):
            return f"bad choice {str(c)[:120]}"
    return "" if isinstance(doc.get("model"), str) and isinstance(doc.get("usage"), dict) else "no model/usage"


async def _events(resp: httpx.Response, inp: HttpInput, report: HttpFuzzReport) -> None:
    """Read an SSE answer (or walk away from it after ``inp.abandon_after`` lines) and check it."""
    data, finals, read = [], 0, 0
    async for line in resp.aiter_lines():
        read += 1
        if inp.abandon_after is not None and read > inp.abandon_after:
            report.abandoned += 1
            return  # leaving the stream block closes the connection mid-stream
        if line.startswith("data:"):
            data.append(line[5:].strip())
    problem = "" if data and data[-1] == "[DONE]" else "no data: [DONE]"
    errored = False
    for item in data[:-1]:
        try:
            chunk = json.loads(item)
        except ValueError:
            problem = problem or f"non-JSON event {item[:80]}"
            continue
        if "error" in chunk:
            errored = True  # an error after the stream started (documented)
            continue
        finals += sum(c.get("finish_reason") is not None for c in chunk.get("choices", ()))
        if not isinstance(chunk.get("model"), str):
            problem = problem or "chunk without model"
    if not problem and not errored and _expected_choices(inp) not in (None, finals):
        problem = f"{finals} finished choices, expected {_expected_choices(inp)}"
    if problem:
        report.malformed_ok += 1
        report.finding("stream", inp, problem)


def _check_status(inp: HttpInput, status: int, text: str, report: HttpFuzzReport) -> None:
    report.statuses[str(status)] += 1
    if status not in DOCUMENTED:
        if status >= 500:
            report.internal += 1
        else:
            report.undocumented += 1
        report.finding(f"status {status}", inp, text)
    elif status != 200 and inp.method != "HEAD" and not _is_error_json(text):
        report.bad_error_body += 1
        report.finding(f"error body of {status}", inp, text)


async def _one(client: httpx.AsyncClient, inp: HttpInput, report: HttpFuzzReport) -> None:
    try:
        async with client.stream(inp.method, inp.path, headers=inp.headers, content=inp.content,
                                 timeout=inp.timeout) as resp:
            if resp.status_code == 200 and resp.headers.get("content-type", "").startswith("text/event-stream"):
                report.statuses["200"] += 1
                await _events(resp, inp, report)
            else:
                await resp.aread()
                _check_status(inp, resp.status_code, resp.text, report)
                if resp.status_code == 200 and inp.method != "HEAD":
                    try:
                        breach = contract_breach(inp, resp.request.url.path, resp.json())
                    except ValueError:
                        breach = "non-JSON 200"
                    if breach:
                        report.malformed_ok += 1
                        report.finding("200", inp, breach)
        report.inputs += 1
    except httpx.TimeoutException:
        report.inputs += 1
        report.client_timeouts += 1
    except httpx.LocalProtocolError:  # h11 would not send it (e.g. a NUL in a header)
        report.client_refused += 1
    except httpx.TransportError as exc:  # closed without an answer
        report.inputs += 1
        report.dropped += 1
        report.finding("dropped", inp, repr(exc))


async def base_model_id(url: str) -> str:
    """The base model's id as ``/v1/models`` lists it first."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        resp = await client.get("/v1/models", headers={"authorization": f"Bearer {INFER_TOKEN}"})
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]


async def fuzz_http(url: str, targets: FuzzTargets, n: int, seed: int, concurrency: int = 16) -> HttpFuzzReport:
    """``n`` seeded inputs against the HTTP API at ``url``, ``concurrency`` at a time."""
    report = HttpFuzzReport()
    base_id = await base_model_id(url)
    rng = random.Random(seed)
    queue = collections.deque(rng.randrange(2**63) for _ in range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:

        async def worker() -> None:
            while queue:
                await _one(client, http_input(random.Random(queue.popleft()), targets, base_id), report)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return report
