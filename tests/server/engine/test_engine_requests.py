"""Per-request behaviour inside shared batches: seeds reproducible whatever the
neighbours, stop sequences, cancellation freeing slot and KV, the bounded queue,
and refusals of adapters the slots cannot hold."""
from __future__ import annotations

import asyncio
import threading

import pytest

from adapterctl.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from adapterctl.server.cache.memory import MemoryStore

PROMPT = [2, 651, 7344, 691, 1590, 236761, 108, 2094]


def test_seed_is_reproducible_regardless_of_neighbours(run, make_engine, dict_store, collect, request_for):
    engine = make_engine(dict_store, max_adapters=4)
    sampled = dict(temperature=1.5, top_p=0.95, top_k=50, seed=1234)
    _, alone = run(collect(engine, request_for(PROMPT, 16, "r8-qkvo", **sampled)))

    async def crowded():
        neighbours = [collect(engine, request_for(PROMPT[:n], 20, a, temperature=t, seed=n))
                      for n, a, t in ((3, None, 0.0), (5, "r4-qv", 1.0), (7, "r64-all", 2.0), (8, "r8-qkvo", 0.7))]
        target = collect(engine, request_for(PROMPT, 16, "r8-qkvo", **sampled))
        results = await asyncio.gather(*neighbours[:2], target, *neighbours[2:])
        return results[2][1]

    again = run(crowded())
    assert again.token_ids == alone.token_ids
    other_seed = run(collect(engine, request_for(PROMPT, 16, "r8-qkvo", **dict(sampled, seed=99))))[1]
    greedy = run(collect(engine, request_for(PROMPT, 16, "r8-qkvo")))[1]
    assert len({tuple(alone.token_ids), tuple(other_seed.token_ids), tuple(greedy.token_ids)}) > 1


def test_stop_sequence_trims_text_and_streams_consistently(run, make_engine, collect, request_for, tiny_tokenizer):
    engine = make_engine(None)
    _, full = run(collect(engine, request_for(PROMPT, 24)))
    text = full.text
    assert len(text) > 8, text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    events, cut = run(collect(engine, request_for(PROMPT, 24, stop=("zzqq-never", stop))))
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    assert "".join(e.text for e in events) == cut.text
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)


def test_max_new_tokens_and_eos_finish_reasons(run, make_engine, collect, request_for):
    engine = make_engine(None)
    _, result = run(collect(engine, request_for(PROMPT, 12)))
    assert result.finish_reason == "length" and result.completion_tokens == 12
    assert result.prompt_tokens == len(PROMPT) and result.adapter is None
    ids = result.token_ids
    first_new = next((i for i in range(1, len(ids)) if ids[i] not in ids[:i]), 0)
    engine._eos.add(ids[first_new])  # make a later token an end-of-sequence token
    _, result = run(collect(engine, request_for(PROMPT, 12)))
    assert result.finish_reason == "eos" and result.token_ids == ids[: first_new + 1]


def test_cancel_frees_slot_and_kv_for_the_next_request(run, make_engine, dict_store, collect, request_for):
    engine = make_engine(dict_store, max_adapters=1, max_running_requests=2, max_batch_tokens=64)

    async def scenario():
        gen = engine.generate(request_for(PROMPT, 500, "r4-qv", rid="long"))
        for _ in range(3):
            await gen.__anext__()
        assert engine.runner.kv.num_rows == 1 and engine.slots.lru.refcount(dict_store.adapters["r4-qv"].served) == 1
        await gen.aclose()  # the consumer goes away
        # the only slot is needed by another adapter: it must be freed by the cancel
        return await collect(engine, request_for(PROMPT, 4, "r64-all", rid="next"))

    _, result = run(scenario())
    assert result.finish_reason == "length" and result.adapter.name == "r64-all"
    assert engine.runner.kv.num_rows == 0 and engine.scheduler.running == []
    assert [r.served.name for _, r in engine.slots.lru.items()] == ["r64-all"]


def test_task_cancellation_cancels_the_request(run, make_engine, collect, request_for):
    engine = make_engine(None, max_running_requests=1, max_batch_tokens=32)

    async def scenario():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(request_for(PROMPT, 500, rid="long")):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await collect(engine, request_for(PROMPT, 3, rid="after"))  # the single row is free again

    _, result = run(scenario())
    assert result.completion_tokens == 3 and engine.runner.kv.num_rows == 0


def test_full_queue_raises_resource_exhausted(run, make_engine, request_for):
    engine = make_engine(None, max_running_requests=1, max_batch_tokens=32, max_waiting=1)
    rejected = []
    engine.observer.on_queue_rejected = lambda: rejected.append(1)

    async def scenario():
        running = engine.generate(request_for(PROMPT, 500, rid="running"))
        await running.__anext__()  # admitted and decoding
        waiting = engine.generate(request_for(PROMPT, 5, rid="waiting"))
        waiting_task = asyncio.create_task(waiting.__anext__())
        for _ in range(200):  # bounded: until the second request sits in the queue
            if engine.scheduler.num_waiting == 1:
                break
            await asyncio.sleep(0.01)
        assert engine.scheduler.num_waiting == 1
        with pytest.raises(ResourceExhausted, match="queue is full"):
            await engine.generate(request_for(PROMPT, 5, rid="third")).__anext__()
        await running.aclose()
        await waiting_task
        await waiting.aclose()

    run(scenario())
    assert rejected == [1]


def test_refusals(run, make_engine, dict_store, request_for):
    engine = make_engine(dict_store, max_lora_rank=16)
    with pytest.raises(FailedPrecondition, match="rank 64"):
        run(engine.generate(request_for(PROMPT, 4, "r64-all")).__anext__())
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        run(engine.generate(request_for(PROMPT, 0)).__anext__())
    with pytest.raises(InvalidArgument, match="empty"):
        run(engine.generate(request_for([], 4)).__anext__())
    with pytest.raises(InvalidArgument, match="token ids"):
        run(engine.generate(request_for([10**9], 4)).__anext__())


class _DirStore(MemoryStore):
    """Resolves a name to a saved PEFT dir and loads it with the cache's real loader."""

    def __init__(self, dirs, base) -> None:
        super().__init__({})
        self.dirs, self.base = dirs, base

    async def resolve(self, ref, routing_key=""):
        from adapterctl.server.types import ServedAdapter

        return ServedAdapter(ref, 1, "sha256:" + "0" * 64)

    async def get(self, served):
        from adapterctl.server.cache.loaded import load_peft_dir

        return load_peft_dir(self.dirs[served.name], self.base, 64, served=served)


@pytest.mark.parametrize("feature,kwargs", [
    ("DoRA", dict(use_dora=True)),
    ("modules_to_save", dict(modules_to_save=["lm_head"])),
])
def test_dora_and_modules_to_save_are_failed_precondition(feature, kwargs, run, make_engine, tiny_model, tiny_base,
                                                          tmp_path, request_for, save_adapter):
    path = save_adapter(tiny_model, tmp_path / feature, seed=0, r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj"], **kwargs)
    engine = make_engine(_DirStore({feature: path}, tiny_base))
    with pytest.raises(FailedPrecondition, match=feature):
        run(engine.generate(request_for(PROMPT, 4, feature)).__anext__())


def _mid_forward_arrival(engine):
    """Let a hook on the decode thread submit a request mid-forward: returns ``arrive(loop, into,
    start, rid)``, which runs ``start()`` (a coroutine submitting request ``rid``) as a task on
    ``loop``, gives that task to the future ``into`` and blocks until ``rid`` is queued."""
    queued: dict[str, threading.Event] = {}
    submit = engine.scheduler.submit

    def submit_and_signal(seq):
        submit(seq)
        queued.setdefault(seq.request.request_id, threading.Event()).set()

    def arrive(loop, into: asyncio.Future, start, rid: str) -> None:
        event = queued.setdefault(rid, threading.Event())
        loop.call_soon_threadsafe(lambda: into.set_result(asyncio.ensure_future(start())))
        assert event.wait(30)

    engine.scheduler.submit = submit_and_signal
    return arrive


async def _while_long_decodes(engine, request_for, armed: threading.Event, new: asyncio.Future) -> None:
    """Start a 50-token request "long"; once it has its first token set ``armed`` (a hook on the
    decode thread then submits a request mid-step), await the task the hook puts in ``new``,
    then close "long"."""
    long = engine.generate(request_for(PROMPT, 50, rid="long"))
    await long.__anext__()
    armed.set()
    await (await new)
    await long.aclose()


@pytest.mark.parametrize("mode,first_after_arrival", [("interleave", "new"), ("separate", "long")])
def test_interleaved_prefill_answers_before_the_running_step_ends(mode, first_after_arrival, run, make_engine,
                                                                  collect, request_for):
    """A request arriving mid-step is prefilled between that step's layers ("interleave"),
    so its first token comes before the running rows' token of that step."""
    engine = make_engine(None, prefill_mode=mode)
    sampled: list[list[str]] = []
    engine.logits_hook = lambda seqs, _: sampled.append(sorted(s.request.request_id for s in seqs))
    armed, layer = threading.Event(), engine.runner.decoder_layer
    arrive = _mid_forward_arrival(engine)

    async def scenario():
        loop = asyncio.get_running_loop()
        new: asyncio.Future = loop.create_future()

        def slow_layer(i, *args):
            if i == 1 and armed.is_set() and not args[2].prefill:  # a decode step, paused after layer 0
                armed.clear()  # the new request is queued while this step is mid-forward
                arrive(loop, new, lambda: collect(engine, request_for(PROMPT, 2, rid="new")), "new")
                sampled.append(["<arrived>"])
            return layer(i, *args)

        engine.runner.decoder_layer = slow_layer
        await _while_long_decodes(engine, request_for, armed, new)

    run(scenario())
    after = sampled[sampled.index(["<arrived>"]) + 1]
    assert after == [first_after_arrival]


def test_a_request_arriving_during_the_greedy_head_is_served_before_the_rest_of_it(run, make_engine, collect,
                                                                                   request_for):
    """Interleave mode: a request that arrives while a decode step runs its greedy LM head (an
    estimate in vocabulary slices, started "whole" since nobody waited) is prefilled after the
    current slice, so its first token comes before the running row's token of that step."""
    engine = make_engine(None, prefill_mode="interleave")
    head = engine.runner.greedy_head
    assert head is not None  # the tiny model's head has Gemma's 262k rows: eight slices
    order: list[str] = []
    append, pieces, armed = engine._append, head.pieces, threading.Event()
    arrive = _mid_forward_arrival(engine)

    def record(seq, token, *args, **kwargs):
        order.append(seq.request.request_id)
        return append(seq, token, *args, **kwargs)

    async def scenario():
        loop = asyncio.get_running_loop()
        new: asyncio.Future = loop.create_future()

        def slow_pieces(hs, chunk):
            run_ = pieces(hs, chunk)
            got = next(run_)  # the estimate's first slice
            if armed.is_set():  # "long"'s decode step: the new request arrives now
                armed.clear()
                arrive(loop, new, lambda: collect(engine, request_for(PROMPT, 2, rid="new")), "new")
                order.append("<arrived>")
            yield got
            yield from run_

        engine._append, head.pieces = record, slow_pieces
        await _while_long_decodes(engine, request_for, armed, new)

    run(scenario())
    assert order[order.index("<arrived>") + 1] == "new"


@pytest.mark.parametrize("mode,merge_until,after", [
    ("interleave", 1.0, ["a", "b"]),  # merged after "a"'s last layer: one LM-head pass for both
    ("interleave", 0.4, ["a"]),  # "a" is past 40 % of its layers: "b" waits for its own forward
    ("separate", 1.0, ["a"]),
])
def test_prompt_arriving_during_a_prefill_merges_into_it(mode, merge_until, after, run, make_engine, collect,
                                                         request_for):
    """On an idle engine, a prompt that arrives while another is in its layers rides along in
    it when that one is early enough (``prefill_merge_until``): both first tokens come out of
    one LM-head pass, and each is the token it gets alone."""
    engine = make_engine(None, prefill_mode=mode, prefill_merge_until=merge_until)
    sampled: list[list[str]] = []
    engine.logits_hook = lambda seqs, _: sampled.append(sorted(s.request.request_id for s in seqs))
    layer, arrive = engine.runner.decoder_layer, _mid_forward_arrival(engine)

    async def scenario():
        loop = asyncio.get_running_loop()
        second: asyncio.Future = loop.create_future()

        def slow_layer(i, *args):
            if i == 1 and not second.done() and args[2].prefill:  # "a"'s prefill, after layer 0
                arrive(loop, second, lambda: collect(engine, request_for(PROMPT[:5], 2, rid="b")), "b")
                sampled.append(["<arrived>"])
            return layer(i, *args)

        engine.runner.decoder_layer = slow_layer
        first = await collect(engine, request_for(PROMPT, 2, rid="a"))
        joined = await (await second)
        return first[1], joined[1]

    a, b = run(scenario())
    assert sampled[sampled.index(["<arrived>"]) + 1] == after
    alone = [run(collect(engine, request_for(p, 2, rid="x")))[1].token_ids for p in (PROMPT, PROMPT[:5])]
    assert [a.token_ids, b.token_ids] == alone
