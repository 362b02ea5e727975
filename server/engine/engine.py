"""``BatchingEngine``: the Engine protocol over one decode thread that runs continuous,
heterogeneous-adapter batches (scheduler -> model runner -> per-row sampling).

Threads: the asyncio side validates, resolves and loads adapter weights (through the
adapter store, off the decode loop), then queues a :class:`Sequence`; the decode
thread owns the model, KV cache and device slots, and streams events back with
``loop.call_soon_threadsafe``. Admin operations that touch slots run on the decode
thread between steps.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable

import torch

from adapterctl.basemodel import BaseModel
from adapterctl.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from adapterctl.server import omp
from adapterctl.server.engine import gc_heap
from adapterctl.server.engine.admin import AdapterAdmin
from adapterctl.server.engine.config import EngineConfig
from adapterctl.server.engine.dtypes import resolve_dtype
from adapterctl.server.engine.grammar import Grammars
from adapterctl.server.engine.heap import IdleTrimmer
from adapterctl.server.engine.prefill import Action, Piece, PrefillPolicy
from adapterctl.server.engine.prefix import PrefixCache
from adapterctl.server.engine.runner import Forward, ModelRunner
from adapterctl.server.engine.sampling import make_generator, select
from adapterctl.server.engine.scheduler import Scheduler, Sequence
from adapterctl.server.engine.slots import DeviceSlots
from adapterctl.server.textstream import StopTextStream
from adapterctl.server.types import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    AdapterSource,
    AdapterStatus,
    EngineObserver,
    GenerationRequest,
    GenerationResult,
    HostAdapter,
    ServedAdapter,
    TokenEvent,
    TokenLogprob,
)

log = logging.getLogger(__name__)


class BatchingEngine:
    """Continuous batching of many adapters in one forward; see the module docstring.
    Admin operations (ListAdapters, Load/Unload/Pin, alias refresh) are delegated to
    :class:`~adapterctl.server.engine.admin.AdapterAdmin` over this engine's public
    :meth:`fetch`, :meth:`on_decode_thread` and :meth:`wake`."""

    features = frozenset({"logprobs", "response_format"})  # beyond plain generation (server.generation)

    def __init__(self, base: BaseModel, store: AdapterSource | None = None, config: EngineConfig | None = None,
                 observer: EngineObserver | None = None, *, model: Any = None, tokenizer: Any = None) -> None:
        self.base = base
        self.store = store
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self.tokenizer = tokenizer
        self.max_new_tokens_limit = self.config.max_new_tokens_limit
        self.max_prompt_tokens = self.config.max_prompt_tokens
        self.device = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype, self._dtype_reason = resolve_dtype(self.config.dtype, self.device)  # "auto" resolved
        self._model = model
        self.runner: ModelRunner | None = None
        self.scheduler: Scheduler | None = None
        self.slots: DeviceSlots | None = None
        self.prefix: PrefixCache | None = None
        self._eos: set[int] = set()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._commands: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._commands_lock = threading.Lock()
        self.admin = AdapterAdmin(self)
        self._gc_held = False  # this engine holds a gc_heap freeze (from start() to stop())
        self._trimmer = IdleTrimmer()  # gives freed heap back to the OS when idle (see heap.py)
        # Test/debug hook: called on the decode thread with (sampled sequences, their logits [n, vocab]).
        self.logits_hook: Callable[[list[Sequence], torch.Tensor], None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Start the decode thread, which loads tokenizer and model and then serves; returns once
        loaded (raising what loading raised). The calling thread gives back its OpenMP pool:
        the decode thread's must be the only one (see :mod:`adapterctl.server.omp`)."""
        if self._thread is not None:
            return
        omp.release_pool()
        loaded: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(loaded,), name="batching-engine", daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(loaded)
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise
        if self.config.gc_freeze:
            gc_heap.hold()
            self._gc_held = True

    def _run(self, loaded: concurrent.futures.Future) -> None:
        """The decode thread: load (all of the engine's compute runs on this thread), then serve."""
        try:
            self._load()
        except BaseException as exc:
            loaded.set_exception(exc)
            return
        loaded.set_result(None)
        self._loop()

    def _load(self) -> None:
        from adapterctl.basemodel import load_model, load_tokenizer

        cfg = self.config
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.base)
        log.info("engine dtype %s (%s) on %s", self.dtype, self._dtype_reason, self.device)
        if self._model is not None:  # the engine owns a model it is given: cast in place
            model = self._model.to(getattr(torch, self.dtype))
        else:
            model = load_model(self.base, self.device, self.dtype)
        self._model = None  # the runner owns it now
        max_len = cfg.max_prompt_tokens + cfg.max_new_tokens_limit
        self.runner = ModelRunner(model, max_rows=cfg.max_running_requests, max_positions=max_len,
                                  num_slots=cfg.max_adapters, max_rank=cfg.max_lora_rank, lora_modules=cfg.lora_modules,
                                  backend=cfg.lora_backend, gemm=cfg.cpu_gemm, prepack=cfg.cpu_prepack,
                                  greedy_head=cfg.cpu_greedy_head, planned_layers=cfg.cpu_planned_layers,
                                  page_rank=cfg.lora_page_rank)
        self.max_prompt_tokens = min(cfg.max_prompt_tokens, self.runner.max_positions - 1)
        self.slots = DeviceSlots(self.runner.bank, self.observer)
        self.grammars = Grammars(self.tokenizer, self.runner.config.vocab_size)
        if cfg.prefix_cache_bytes:
            self.prefix = PrefixCache(cfg.prefix_cache_bytes, cfg.prefix_block_tokens, self.base.fingerprint,
                                      self.observer)
        policy = PrefillPolicy(cfg.prefill_mode, cfg.prefill_merge_until)
        self.scheduler = Scheduler(cfg, self.runner.kv, self.slots, policy, self.prefix)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            self._eos.add(int(self.tokenizer.eos_token_id))
        if cfg.ignore_eos:
            self._eos = set()
        log.info("batching engine ready: %s on %s (%s), %d slots, max rank %d, %d running, prefix cache %d MiB",
                 self.base.id, self.device, self.dtype, cfg.max_adapters, cfg.max_lora_rank, cfg.max_running_requests,
                 cfg.prefix_cache_bytes >> 20)

    async def stop(self) -> None:
        """Finish every request as cancelled and stop the decode thread."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        if self._gc_held:
            self._gc_held = False
            gc_heap.release()
        sched = self.scheduler
        for seq in list(sched.waiting) + list(sched.running):
            self._finish(seq, FINISH_CANCELLED)
        sched.waiting.clear()
        if self.store is not None:
            self.store.close()

    # ---- generation --------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | GenerationResult]:
        """Zero or more TokenEvents, then one GenerationResult (see api.Engine)."""
        if self.scheduler is None or self._stopping.is_set():
            raise Unavailable("the engine is not running")
        params = request.sampling.validate(self.max_new_tokens_limit)
        self._check_prompt(request.prompt_ids, params.max_new_tokens)
        served, adapter = None, None
        if request.adapter:
            served, adapter = await self.fetch(request.adapter, request)
        constraint = None
        if request.response_format is not None:  # compiling a schema can take a while: off the loop
            constraint = await asyncio.to_thread(self.grammars.constraint, request.response_format)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(item: object) -> None:  # decode thread -> this request's consumer
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is gone: nobody is listening
                seq.cancelled = True

        seq = Sequence(request=request, params=params, served=served, adapter=adapter, sink=sink,
                       text=StopTextStream(self.tokenizer, params.stop),
                       generator=make_generator(params.seed) if params.temperature > 0 else None,
                       constraint=constraint)
        try:
            self.scheduler.submit(seq)
        except ResourceExhausted:
            self.observer.on_queue_rejected()
            raise
        self._wake.set()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            if seq.finish_reason is None:
                seq.cancelled = True
                self._wake.set()

    def _check_prompt(self, ids: list[int], max_new: int) -> None:
        if not ids:
            raise InvalidArgument("prompt is empty")
        if len(ids) > self.max_prompt_tokens:
            raise InvalidArgument(f"prompt has {len(ids)} tokens; this server accepts at most {self.max_prompt_tokens}")
        vocab = self.runner.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidArgument(f"prompt token ids must be in [0, {vocab})")
        if len(ids) + max_new > self.config.max_kv_tokens:
            raise InvalidArgument(f"prompt + max_new_tokens ({len(ids) + max_new}) exceeds the KV budget "
                                  f"({self.config.max_kv_tokens} tokens)")

    async def fetch(self, ref: str, request: GenerationRequest | None = None) -> tuple[ServedAdapter, HostAdapter]:
        """Resolve ``ref`` (sticky by ``request.routing_key`` for weighted aliases) and get its
        host weights (loading them), checked against the slots. Records on ``request`` the
        version it runs on (``served``) and its role in the alias (``route``)."""
        if self.store is None:
            raise NotFound(f"adapter {ref!r}: this engine serves the base model only (no adapter store)")
        started = time.perf_counter()
        served = await self.store.resolve(ref, request.routing_key if request is not None else "")
        if request is not None:  # resolved once, at admission: in-flight requests keep their version
            request.served = served
            request.route = self.store.route_role(ref, served)
        adapter = await self.store.get(served)
        self.runner.bank.check(adapter)
        log.debug("adapter %s:%d ready on host in %.1f ms", served.name, served.version,
                  1e3 * (time.perf_counter() - started))
        return served, adapter

    # ---- decode thread -------------------------------------------------------------------
    def _loop(self) -> None:
        # inference mode, not just no-grad: no version counters or view tracking, which
        # roughly halves the dispatch cost of each of a step's ~1,000 small ops at one row.
        # Every tensor the engine writes (KV slabs, slot banks) is written on this thread.
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            self._run_commands()
            sched = self.scheduler
            for seq in sched.drop_cancelled():
                self._finish(seq, FINISH_CANCELLED)
            self.admin.evict_retired()
            self._admit()
            plan = sched.plan()
            if not plan:
                self._report(0, 0)
                self._trimmer.idle(force=self.runner.kv.release_idle())
                self._wake.wait(self.config.idle_poll_s)
                continue
            try:
                self._step(plan)
                self._trimmer.stepped()
            except Exception as exc:  # fail this step's sequences, keep serving the rest
                log.exception("decode step failed; failing %d requests", len(plan))
                for seq, _ in plan:
                    if seq in sched.running:
                        sched.release(seq)
                    if seq.finish_reason is None:
                        seq.finish_reason = FINISH_CANCELLED
                        seq.sink(Unavailable(f"engine step failed: {exc}"))

    def _step(self, plan: list) -> None:
        held: list[Sequence] = []  # finished while a forward was paused: released once it is done
        try:
            plan, fwd = self._forward(plan, self.config.max_batch_tokens, held)
            self._sample_and_emit(plan, fwd, None)
        finally:
            for seq in held:
                if seq in self.scheduler.running:
                    self.scheduler.release(seq)

    def _forward(self, plan: list, budget: int, held: list[Sequence], top: bool = True) -> tuple[list, Forward]:
        """Run ``plan``'s forward piece by piece, serving newcomers between pieces as the
        prefill policy says (:mod:`.prefill`); returns (the plan it ended with, the finished
        forward: its logits, or the greedy head's tokens).
        At most ``budget`` prompt tokens go to newcomers. Rows of a paused forward never
        move: sequences finishing meanwhile go to ``held`` instead of being released."""
        full = self.logits_hook is not None  # the hook sees every logit
        fwd = self.runner.start([c for _, c in plan], full_logits=full)
        policy = self.scheduler.policy
        decoding = all(len(c.tokens) == 1 for _, c in plan)
        outside = bool(self._prefill_outside(plan))  # recomputed only after serving newcomers
        # the greedy head stops between its slices for a newcomer where the policy serves one there
        stops = policy.serves_during_head(top, decoding)
        interrupt = (lambda: self.scheduler.has_arrivals) if stops else None
        while not self._stopping.is_set():  # the policy is asked before every piece, the first included
            newcomers = outside or self.scheduler.has_arrivals
            piece = Piece(top=top, decoding=decoding, in_layers=fwd.in_layers, progress=fwd.progress, budget=budget,
                          newcomers=newcomers)
            action = policy.between_pieces(piece)
            if action is Action.INTERLEAVE:
                budget -= self._interleave(plan, budget, held)
            elif action is Action.MERGE:
                extra = self._admit_prefills(plan, budget)
                if extra:
                    joining = self.runner.start([c for _, c in extra], full_logits=full)
                    joining.run_to(fwd.layer)
                    fwd.absorb(joining)
                    by_chunk = {id(c): (seq, c) for seq, c in plan + extra}
                    plan = [by_chunk[id(c)] for c in fwd.chunks]  # the forward's new order
                    budget -= sum(len(c.tokens) for _, c in extra)
            if action is not Action.CONTINUE:
                outside = bool(self._prefill_outside(plan))
                newcomers = outside or self.scheduler.has_arrivals
            if not fwd.step(whole_head=not newcomers, interrupt=interrupt):
                return plan, fwd
        while fwd.step(whole_head=True):  # only when stopping: finish without serving newcomers
            pass
        return plan, fwd

    def _admit(self) -> None:
        sched = self.scheduler
        sched.admit()
        for seq, error in sched.take_rejected():
            seq.finish_reason = FINISH_CANCELLED
            seq.sink(error)

    def _prefill_outside(self, plan: list) -> list[Sequence]:
        """Running sequences still in prefill that are not part of ``plan``, oldest first."""
        busy = {id(s) for s, _ in plan}
        return sorted((s for s in self.scheduler.running if s.in_prefill and not s.cancelled and id(s) not in busy),
                      key=lambda s: s.arrival)

    def _admit_prefills(self, plan: list, budget: int) -> list:
        """Admit what fits now; the next prompt chunks (at most ``budget`` tokens) of
        sequences in prefill outside ``plan``, ordered by slot."""
        self._admit()
        used, sub = 0, []
        for seq in self._prefill_outside(plan):
            if used >= budget:
                break
            chunk = seq.next_chunk(budget - used)
            sub.append((seq, chunk))
            used += len(chunk.tokens)
        sub.sort(key=lambda sc: sc[1].slot)
        return sub

    def _interleave(self, paused: list, budget: int, held: list[Sequence]) -> int:
        """Prefill newcomers while the decode forward of ``paused`` waits; returns tokens used."""
        sub = self._admit_prefills(paused, budget)
        if not sub:
            return 0
        used = sum(len(c.tokens) for _, c in sub)
        sub, fwd = self._forward(sub, budget - used, held, top=False)
        self._sample_and_emit(sub, fwd, held)
        return sum(len(c.tokens) for _, c in sub)

    def _sample_and_emit(self, plan: list, fwd: Forward, held: list[Sequence] | None) -> None:
        """Sample every sampling chunk's token (or take the greedy head's) and stream it; a
        finished sequence is released now, or put in ``held`` while a paused forward still uses
        its row."""
        sampled = []
        for seq, chunk in plan:
            seq.computed += len(chunk.tokens)
            if self.prefix is not None and chunk.start_pos < len(seq.prompt) <= seq.computed:
                self.prefix.store(seq.served, seq.prompt, self.runner.kv, seq.row)  # prefill just completed
            if chunk.sample:
                sampled.append(seq)
        logprobs: list[TokenLogprob | None]
        if fwd.tokens is not None:  # argmax-only rows (no hook, logprobs or grammar): the greedy head's
            tokens, logprobs = fwd.tokens, [None] * len(sampled)
        else:
            logits = fwd.logits
            if self.logits_hook is not None:
                self.logits_hook(sampled, logits)
            masks = None
            if any(s.constraint is not None for s in sampled):
                masks = [s.constraint.mask() if s.constraint is not None else None for s in sampled]
            tokens, logprobs = select(logits, [s.params for s in sampled], [s.generator for s in sampled], masks)
        self._report(len(plan), sum(len(c.tokens) for _, c in plan))
        now = time.monotonic()
        for seq, token, logprob in zip(sampled, tokens, logprobs):
            self._append(seq, token, now, held, logprob)

    def _append(self, seq: Sequence, token: int, now: float, held: list[Sequence] | None,
                logprob: Any = None) -> None:
        if seq.cancelled:
            return  # dropped at the next step
        seq.output.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = now
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.constraint is not None:
            seq.constraint.accept(token)
        delta = seq.text.push([token])
        reason = None
        if token in self._eos:
            reason = FINISH_EOS
        elif seq.text.stopped or (seq.constraint is not None and seq.constraint.done):
            reason = FINISH_STOP
        elif len(seq.output) >= seq.params.max_new_tokens:
            reason = FINISH_LENGTH
        seq.sink(TokenEvent([token], delta, [logprob] if logprob is not None else None,
                            seq.served if len(seq.output) == 1 else None))
        if reason is not None:
            if held is None:
                self.scheduler.release(seq)
            else:
                held.append(seq)
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        tail = seq.text.finish()
        if tail:
            seq.sink(TokenEvent([], tail))
        seq.sink(GenerationResult(seq.request.request_id, seq.text.text, list(seq.output), reason,
                                  len(seq.request.prompt_ids), seq.served,
                                  list(seq.logprobs) if seq.params.logprobs else None))

    def _report(self, batch: int, tokens: int) -> None:
        sched = self.scheduler
        self.observer.on_step(batch, tokens, len(sched.running), sched.num_waiting, sched.kv_used())

    def _run_commands(self) -> None:
        with self._commands_lock:
            commands, self._commands = self._commands, []
        for fn, future in commands:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)

    def wake(self) -> None:
        """Wake the decode thread (new work, or state for it to act on)."""
        self._wake.set()

    async def on_decode_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the decode thread between steps (slot state is single-threaded)."""
        if self._thread is None:
            raise Unavailable("the engine is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._commands_lock:
            self._commands.append((fn, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    # ---- admin (Engine protocol) -----------------------------------------------------------
    async def list_adapters(self, name: str | None = None) -> list[AdapterStatus]:
        return await self.admin.list_adapters(name)

    async def load_adapter(self, ref: str) -> AdapterStatus:
        return await self.admin.load_adapter(ref)

    async def unload_adapter(self, ref: str) -> AdapterStatus:
        return await self.admin.unload_adapter(ref)

    async def pin_adapter(self, ref: str, pinned: bool) -> AdapterStatus:
        return await self.admin.pin_adapter(ref, pinned)

    async def refresh_aliases(self) -> list[tuple[str, str, int, int]]:
        return await self.admin.refresh_aliases()
