"""Generate / GenerateStream over a real port: streaming order
and final message, stop sequences, seeds, chat templates, cancel, and parity with stock PEFT."""
from __future__ import annotations

import asyncio

import pytest

from adapterctl.client import AsyncClient


def test_stream_chunks_in_order_then_one_final(client):
    stream = client.generate_stream("The movie was", adapter="alpha", max_new_tokens=12)
    chunks = list(stream)
    final = stream.result
    assert final is not None and len(chunks) >= 1
    assert "".join(c.text for c in chunks) == final.text
    assert [t for c in chunks for t in c.token_ids] == list(final.token_ids)
    assert final.completion_tokens == 12 and final.finish_reason == "length"
    assert (final.adapter.name, final.adapter.version) == ("alpha", 2)
    unary = client.generate("The movie was", adapter="alpha", max_new_tokens=12)
    assert unary.text == final.text and unary.token_ids == final.token_ids


def test_stop_sequence_cuts_text_in_unary_and_stream(client):
    full = client.generate("The movie was", adapter="beta", max_new_tokens=16)
    assert len(full.text) > 8
    stop = full.text[5:8]
    cut = full.text[: full.text.find(stop)]
    result = client.generate("The movie was", adapter="beta", max_new_tokens=16, stop=[stop])
    assert result.finish_reason == "stop" and result.text == cut
    stream = client.generate_stream("The movie was", adapter="beta", max_new_tokens=16, stop=[stop])
    assert "".join(c.text for c in stream) == cut and stream.result.finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client):
    kw = dict(adapter="alpha:1", max_new_tokens=10, temperature=1.0, top_k=50)
    first = client.generate("Hello", seed=7, **kw)
    assert client.generate("Hello", seed=7, **kw).token_ids == first.token_ids
    others = {client.generate("Hello", seed=s, **kw).token_ids for s in (8, 9, 10)}
    assert others != {first.token_ids}


def test_chat_messages_use_the_chat_template(client, server):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Review Jaws."}]
    result = client.chat(turns, max_new_tokens=3)
    tok = server.server.engine.tokenizer
    text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert result.prompt_tokens == len(tok(text, add_special_tokens=False).input_ids)
    assert text.endswith("<start_of_turn>model\n")


def test_cancelled_stream_frees_the_worker(client):
    stream = client.generate_stream("Once upon a time", max_new_tokens=1900)
    chunks = iter(stream)
    next(chunks)
    next(chunks)
    stream.cancel()
    assert list(chunks) == []  # a cancelled stream just ends for the caller
    # ~2000 more tokens would take tens of seconds; the worker must be free at once.
    assert client.generate("after cancel", max_new_tokens=2, timeout=15).completion_tokens >= 1


def test_async_client_streams_and_generates(server):
    async def run():
        async with AsyncClient(server.address, timeout=60) as c:
            stream = c.generate_stream("The movie was", adapter="alpha:1", max_new_tokens=6)
            text = "".join([chunk.text async for chunk in stream])
            unary = await c.generate("The movie was", adapter="alpha:1", max_new_tokens=6)
            return text, stream.result, unary

    text, final, unary = asyncio.run(run())
    assert text == final.text == unary.text and final.adapter.version == 1


def test_greedy_output_matches_stock_peft(client, tiny_base, make_adapter):
    """The served adapter's greedy tokens equal PeftModel.from_pretrained + generate."""
    import torch
    from peft import PeftModel

    from adapterctl.basemodel import load_model, load_tokenizer

    tok = load_tokenizer(tiny_base)
    model = PeftModel.from_pretrained(load_model(tiny_base, device="cpu"), str(make_adapter("alpha1", seed=1)))
    ids = tok("A witty review:", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    expected = out[0, ids.shape[1]:].tolist()
    served = client.generate("A witty review:", adapter="alpha:1", max_new_tokens=10)
    assert list(served.token_ids) == expected
    assert served.text == tok.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("prompt", ["ok"])
def test_request_id_is_echoed(client, prompt):
    assert client.generate(prompt, max_new_tokens=1, request_id="req-42").request_id == "req-42"
    assert len(client.generate(prompt, max_new_tokens=1).request_id) == 32
