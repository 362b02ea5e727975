"""``PeftEngine``: the reference implementation of the Engine protocol.

Requests run one at a time on a single worker thread with Hugging Face
``generate`` and PEFT's multi-adapter API. Simple and exact rather than fast: it
is the walking-skeleton engine and the correctness reference for the batching engine.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from adapterctl.basemodel import BaseModel
from adapterctl.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from adapterctl.home import home
from adapterctl.server.engine.api import (FINISH_CANCELLED, FINISH_EOS, FINISH_LENGTH, FINISH_STOP, AdapterStatus,
                                          EngineObserver, GenerationRequest, GenerationResult, TokenEvent)
from adapterctl.server.reference_adapters import PeftAdapters, served_of
from adapterctl.server.textstream import StopTextStream

if TYPE_CHECKING:
    from adapterctl.registry import Manifest, RegistryReader

log = logging.getLogger(__name__)
_DONE = object()


@dataclass
class PeftEngineConfig:
    """Settings of the reference engine."""

    max_adapters: int = 8
    max_lora_rank: int = 64
    max_waiting: int = 64
    max_new_tokens_limit: int = 1024
    max_prompt_tokens: int = 2048  # also capped by the model's window
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str = "float32"
    cache_dir: Path | None = None  # None: $ADAPTERCTL_HOME/adapters
    alias_ttl: float = 30.0  # seconds a resolved NAME / NAME:ALIAS is trusted


@dataclass
class _Job:
    request: GenerationRequest
    manifest: "Manifest | None"
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancel: threading.Event

    def emit(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class PeftEngine:
    """Engine protocol over HF generate + PEFT; one request at a time, FIFO."""

    def __init__(self, base: BaseModel, reader: "RegistryReader", config: PeftEngineConfig | None = None,
                 observer: EngineObserver | None = None) -> None:
        self.base = base
        self.config = config or PeftEngineConfig()
        self.observer = observer or EngineObserver()
        self._reader = reader
        self.tokenizer: Any = None
        self.max_new_tokens_limit = self.config.max_new_tokens_limit
        self.max_prompt_tokens = 0
        self.device = "cpu"
        self._adapters: PeftAdapters | None = None
        self._eos: set[int] = set()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="peft-engine")
        self._waiting = 0
        self._running = 0
        self._count_lock = threading.Lock()

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Load the tokenizer and model (on the worker thread, so the event loop stays responsive)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        import torch

        from adapterctl.basemodel import load_model, load_tokenizer

        self.device = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(self.base)
        model = load_model(self.base, device=self.device, dtype=self.config.dtype)
        eos = model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._gen_defaults = {"pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": sorted(self._eos)}
        window = int(getattr(model.config, "max_position_embeddings", 0) or 8192)
        self._window = window
        self.max_prompt_tokens = min(self.config.max_prompt_tokens, window - 1)
        cache_dir = Path(self.config.cache_dir or home() / "adapters")
        self._adapters = PeftAdapters(model, self.base, self._reader, cache_dir, self.config.max_adapters,
                                      self.config.max_lora_rank, self.observer, self.config.alias_ttl)
        log.info("reference engine ready: %s on %s (%s)", self.base.id, self.device, self.config.dtype)

    async def stop(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ---- generation -----------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | GenerationResult]:
        """TokenEvents as text becomes safe to send, then one GenerationResult."""
        if self._adapters is None:
            raise Unavailable("engine is not started")
        if not request.prompt_ids:
            raise InvalidArgument("prompt is empty")
        if len(request.prompt_ids) > self.max_prompt_tokens:
            raise InvalidArgument(f"prompt has {len(request.prompt_ids)} tokens; this server accepts at most "
                                  f"{self.max_prompt_tokens}")
        request.sampling.validate(self.max_new_tokens_limit)
        manifest = await asyncio.to_thread(self._adapters.resolve, request.adapter) if request.adapter else None
        with self._count_lock:  # one runs, max_waiting may queue behind it
            if self._waiting + self._running >= 1 + self.config.max_waiting:
                self.observer.on_queue_rejected()
                raise ResourceExhausted(f"{self._waiting} requests are already waiting (max {self.config.max_waiting})")
            self._waiting += 1
        loop = asyncio.get_running_loop()
        job = _Job(request, manifest, loop, asyncio.Queue(), threading.Event())
        if manifest is not None:
            self._adapters.acquire(manifest.digest)
        try:
            future = loop.run_in_executor(self._executor, self._run, job)
        except RuntimeError:  # executor shut down
            self._finish_job(job, started=False)
            raise Unavailable("engine is stopping") from None
        future.add_done_callback(functools.partial(self._on_job_done, job))
        try:
            while (item := await job.queue.get()) is not _DONE:
                yield item
            if future.cancelled():  # dropped from the executor by stop()
                raise Unavailable("the engine stopped before running this request")
            yield await future
        finally:
            job.cancel.set()

    def _on_job_done(self, job: _Job, future: asyncio.Future) -> None:
        """On the event loop: a job the executor dropped (stop()) never ran, so settle it here."""
        if future.cancelled():
            self._finish_job(job, started=False)
            job.queue.put_nowait(_DONE)
        else:
            future.exception()  # retrieved so an abandoned request does not log "never retrieved"

    def _finish_job(self, job: _Job, started: bool) -> None:
        with self._count_lock:
            if started:
                self._running -= 1
            else:
                self._waiting -= 1
        if job.manifest is not None:
            self._adapters.release(job.manifest.digest)
        if started:
            self._step(0, batch=0)  # an empty step: reports the new running/waiting counts

    def _run(self, job: _Job) -> GenerationResult:
        with self._count_lock:
            self._waiting -= 1
            self._running += 1
        try:
            if job.cancel.is_set():
                return self._result(job, [], "", FINISH_CANCELLED)
            return self._generate(job)
        finally:
            job.emit(_DONE)
            self._finish_job(job, started=True)

    def _generate(self, job: _Job) -> GenerationResult:
        import torch

        req, sp = job.request, job.request.sampling
        stream = StopTextStream(self.tokenizer, sp.stop)
        budget = min(sp.max_new_tokens, max(1, self._window - len(req.prompt_ids)))
        kwargs: dict[str, Any] = dict(self._gen_defaults, max_new_tokens=budget, do_sample=sp.temperature > 0)
        if sp.temperature > 0:
            kwargs.update(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        ids = torch.tensor([req.prompt_ids], device=self.device)
        streamer = _Streamer(job, stream, self)
        with self._adapters.use(job.manifest) as model, torch.inference_mode():
            if sp.seed is not None:  # after use(): loading an adapter draws from the RNG
                torch.manual_seed(sp.seed)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                 stopping_criteria=[_StopWhen(job.cancel, stream)], **kwargs)
        tokens = out[0, ids.shape[1]:].tolist()
        tail = stream.finish()
        if tail:
            job.emit(TokenEvent([], tail))
        if stream.stopped:
            reason = FINISH_STOP
        elif job.cancel.is_set():
            reason = FINISH_CANCELLED
        elif tokens and tokens[-1] in self._eos:
            reason = FINISH_EOS
        else:
            reason = FINISH_LENGTH
        return self._result(job, tokens, stream.text, reason)

    def _result(self, job: _Job, tokens: list[int], text: str, reason: str) -> GenerationResult:
        served = served_of(job.manifest) if job.manifest is not None else None
        return GenerationResult(job.request.request_id, text, tokens, reason, len(job.request.prompt_ids), served)

    def _step(self, tokens: int, batch: int = 1) -> None:
        with self._count_lock:
            running, waiting = self._running, self._waiting
        self.observer.on_step(batch, tokens, running, waiting, 0.0)

    # ---- admin ----------------------------------------------------------------------
    async def _on_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def list_adapters(self, name: str | None = None) -> list[AdapterStatus]:
        return await asyncio.to_thread(self._list, name)

    def _list(self, name: str | None) -> list[AdapterStatus]:
        rows = []
        for adapter in [name] if name else self._reader.list_names():
            aliases = self._reader.aliases(adapter)
            versions = self._reader.list_versions(adapter)
            if name and not versions:
                raise NotFound(f"adapter {name!r} not found")
            for manifest in versions:
                names = tuple(sorted(a for a, v in aliases.items() if v == int(manifest.version)))
                rows.append(self._status(manifest, names))
        return rows

    def _status(self, manifest: "Manifest", aliases: tuple[str, ...] | None = None) -> AdapterStatus:
        resident = self._adapters.device.peek(manifest.digest)
        return AdapterStatus(
            name=manifest.name, version=int(manifest.version), digest=manifest.digest,
            tier=self._adapters.tier(manifest), pinned=self._adapters.device.is_pinned(manifest.digest)
            if resident else False, bytes=int(manifest.total_bytes or 0),
            rank=int((manifest.lora or {}).get("rank", 0) or 0), active_requests=self._adapters.active(manifest.digest),
            aliases=aliases if aliases is not None else tuple(self._adapters.aliases_of(manifest.digest)))

    async def _resolve(self, ref: str) -> "Manifest":
        return await asyncio.to_thread(self._adapters.resolve, ref)

    async def load_adapter(self, ref: str) -> AdapterStatus:
        manifest = await self._resolve(ref)
        await self._on_worker(self._adapters.load, manifest)
        return self._status(manifest)

    async def unload_adapter(self, ref: str) -> AdapterStatus:
        manifest = await self._resolve(ref)
        await self._on_worker(self._adapters.unload, manifest.digest)
        return self._status(manifest)

    async def pin_adapter(self, ref: str, pinned: bool) -> AdapterStatus:
        manifest = await self._resolve(ref)
        await self._on_worker(self._adapters.pin, manifest, pinned)
        return self._status(manifest)

    async def refresh_aliases(self) -> list[tuple[str, str, int, int]]:
        """Re-resolve aliases; versions no reference points at leave the device once unused."""
        changes = await asyncio.to_thread(self._adapters.refresh)
        if changes:
            await self._on_worker(self._drop_unreferenced)
        return changes

    def _drop_unreferenced(self) -> None:
        for digest in self._adapters.unreferenced():
            with contextlib.suppress(Exception):  # pinned or in use: stays until evicted
                self._adapters.unload(digest)


class _Streamer:
    """HF streamer: the first ``put`` is the prompt, later ones one new token each."""

    def __init__(self, job: _Job, stream: StopTextStream, engine: PeftEngine) -> None:
        self._job, self._stream, self._engine = job, stream, engine
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            self._engine._step(int(value.numel()))
            return
        ids = [int(t) for t in value.reshape(-1).tolist()]
        if self._stream.stopped:
            return
        text = self._stream.push(ids)
        self._job.emit(TokenEvent(ids, text))
        self._engine._step(len(ids))

    def end(self) -> None:
        pass


class _StopWhen:
    """Stopping criterion: the client went away, or a stop sequence matched."""

    def __init__(self, cancel: threading.Event, stream: StopTextStream) -> None:
        self._cancel, self._stream = cancel, stream

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = self._cancel.is_set() or self._stream.stopped
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

