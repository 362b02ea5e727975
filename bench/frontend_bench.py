"""p4: the cost of the network front ends. 32 concurrent streams, each on its own rank-16
adapter, through the HTTP API (SSE, raw httpx) and through gRPC GenerateStream, both on
loopback against one AdapterctlServer over the bench's engine, vs the same requests
submitted to the engine in-process. Ratio = in-process seconds / front-end seconds (1.0 =
free), median over interleaved triples so a noisy neighbour hits all three alike.
The clients run in a separate process (as they would on other machines): what is
measured is the server's cost of serving the API, not the client's parsing."""
from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench.common import median, prompts, request, run_all


async def _http_streams(url: str, texts: list[str], names: list[str], new: int) -> tuple[float, int]:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(texts) + 8)) as client:
        async def one(text: str, name: str) -> int:
            body = {"model": name, "prompt": text, "max_tokens": new, "temperature": 0, "stream": True}
            chunks = 0
            async with client.stream("POST", url, json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunks += 1
            return chunks

        start = time.monotonic()
        counts = await asyncio.gather(*(one(t, n) for t, n in zip(texts, names)))
        return time.monotonic() - start, sum(counts)


async def _grpc_streams(address: str, texts: list[str], names: list[str], new: int) -> tuple[float, int]:
    import grpc

    from adapterctl.v1 import adapterctl_pb2 as pb
    from adapterctl.v1 import adapterctl_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def one(text: str, name: str) -> int:
            tokens = 0
            async for msg in stub.GenerateStream(pb.GenerateRequest(adapter=name, prompt=text, max_new_tokens=new)):
                if msg.HasField("chunk"):
                    tokens += len(msg.chunk.token_ids)
            return tokens

        start = time.monotonic()
        counts = await asyncio.gather(*(one(t, n) for t, n in zip(texts, names)))
        return time.monotonic() - start, sum(counts)


def _client(kind: str, target: str, texts: list[str], names: list[str], new: int) -> tuple[float, int]:
    """In the client process: (seconds from first request to last token, chunks or tokens received)."""
    streams = _http_streams if kind == "http" else _grpc_streams
    return asyncio.run(streams(target, texts, names, new))


async def p4(engine, tok, names: list[str], quick: bool) -> dict[str, Any]:
    """Front ends over the in-process engine on the same 32-adapter streaming workload."""
    from adapterctl.server.app import AdapterctlServer
    from adapterctl.server.config import ServerConfig

    n, new, reps = (8, 8, 1) if quick else (32, 32, 5)
    texts = [tok.decode(p[1:]) for p in prompts(tok, n, 16, 32, seed=5)]  # the server adds BOS again
    reqs = [request(f"p4-{i}", tok(t).input_ids, new, names[i]) for i, t in enumerate(texts)]
    for name in names[:n]:
        await engine.load_adapter(name)
    server = AdapterctlServer(ServerConfig(port=0, metrics_port=-1, http_port=0),
                              engine_factory=lambda config, observer: engine)
    await server.start()
    loop = asyncio.get_running_loop()
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        url = f"http://127.0.0.1:{server.http_port}/v1/completions"
        address = f"127.0.0.1:{server.port}"

        async def client(kind: str, target: str, k: int, tokens: int) -> tuple[float, int]:
            return await loop.run_in_executor(pool, _client, kind, target, texts[:k], names[:k], tokens)

        await client("http", url, 2, 2)  # warm-up: the client process, first-call paths
        await client("grpc", address, 2, 2)
        ratios_http, ratios_grpc, t_in, t_http, t_grpc = [], [], [], [], []
        async def inprocess() -> None:
            t_in.append((await run_all(engine, reqs))[0])

        async def http() -> None:
            t_http.append((await client("http", url, n, new))[0])

        async def grpc() -> None:
            seconds, tokens = await client("grpc", address, n, new)
            if tokens != n * new:
                raise RuntimeError(f"gRPC streams returned {tokens} tokens, expected {n * new}")
            t_grpc.append(seconds)

        order = [inprocess, http, grpc]
        for rep in range(reps):  # rotated, so no side always runs first or last in its triple
            for run in order[rep % 3:] + order[: rep % 3]:
                await run()
            ratios_http.append(t_in[-1] / t_http[-1])
            ratios_grpc.append(t_in[-1] / t_grpc[-1])
    finally:
        pool.shutdown()
        server.engine = None  # the bench owns the engine; stop only the front ends
        await server.stop(0)
    return {"p4_http_over_inprocess": median(ratios_http), "p4_grpc_over_inprocess": median(ratios_grpc),
            "p4_inprocess_tok_s": n * new / median(t_in), "p4_http_tok_s": n * new / median(t_http),
            "p4_grpc_tok_s": n * new / median(t_grpc), "p4_requests": n, "p4_new_tokens": new, "p4_reps": reps,
            "p4_http_ratios": " ".join(f"{r:.3f}" for r in ratios_http),
            "p4_grpc_ratios": " ".join(f"{r:.3f}" for r in ratios_grpc)}
