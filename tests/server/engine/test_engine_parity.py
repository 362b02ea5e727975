"""Heterogeneous batches match stock PEFT exactly: for every request (base rows and
adapters of ranks 4/8/16/64 on q,v / q,k,v,o / all linear, one rsLoRA; some joining
mid-way; one prompt longer than the sliding window, prefilled in chunks) the greedy
tokens equal PEFT's batch-of-one ``generate`` and every step's logits are within 1e-3."""
from __future__ import annotations

import asyncio
import copy
import random

import pytest
import torch

MAX_NEW = 12
# (adapter or None, prompt length); the second half joins once the first request has 3 tokens.
WAVE_1 = [(None, 5), ("r4-qv", 9), ("r8-qkvo", 17), ("r16-all-rslora", 100), ("r64-all", 3), ("r4-qv", 23)]
WAVE_2 = [("r64-all", 11), (None, 30), ("r8-qkvo", 6), ("r16-all-rslora", 14)]


def _prompts() -> list[tuple[str | None, list[int]]]:
    rng = random.Random(7)
    return [(name, [rng.randrange(3, 5000) for _ in range(n)]) for name, n in WAVE_1 + WAVE_2]


@pytest.fixture(scope="module")
def peft_reference(tiny_model, peft_dirs):
    """(tokens, logits [steps, vocab]) of stock PEFT / HF generate, batch of one, greedy."""
    from peft import PeftModel

    models = {None: tiny_model}
    out = []
    for name, prompt in _prompts():
        if name not in models:
            models[name] = PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(peft_dirs[name])).eval()
        ids = torch.tensor([prompt], device=tiny_model.device)
        with torch.no_grad():
            gen = models[name].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                        do_sample=False, output_logits=True, return_dict_in_generate=True)
        out.append((gen.sequences[0, len(prompt):].tolist(), torch.stack(gen.logits)[:, 0]))
    return out


@pytest.mark.parametrize("backend,prefill_mode", [("auto", "interleave"), ("gather", "mixed"), ("segment", "separate")])
def test_mixed_batch_matches_peft(
    backend, prefill_mode, run, make_engine, dict_store, collect, request_for, peft_reference
):
    engine = make_engine(dict_store, lora_backend=backend, prefill_mode=prefill_mode, max_adapters=4,
                         max_running_requests=16, max_batch_tokens=48)
    logits: dict[str, list[torch.Tensor]] = {}

    def hook(seqs, rows):
        for seq, row in zip(seqs, rows):
            logits.setdefault(seq.request.request_id, []).append(row.clone())

    engine.logits_hook = hook
    prompts = _prompts()

    async def scenario():
        third_token = asyncio.Event()

        async def one(i: int, wait: bool):
            name, prompt = prompts[i]
            if wait:
                await third_token.wait()
            tokens = []
            async for item in engine.generate(request_for(prompt, MAX_NEW, name, rid=f"r{i}")):
                if hasattr(item, "finish_reason"):
                    return item
                tokens += item.token_ids
                if i == 0 and len(tokens) >= 3:
                    third_token.set()

        first = [one(i, False) for i in range(len(WAVE_1))]
        second = [one(len(WAVE_1) + j, True) for j in range(len(WAVE_2))]
        return await asyncio.gather(*first, *second)

    results = run(scenario(), timeout=120)
    joined_late = [r for r in results[len(WAVE_1):]]
    assert all(r.finish_reason in ("length", "eos") for r in results)
    for i, (result, (want_tokens, want_logits)) in enumerate(zip(results, peft_reference)):
        name = prompts[i][0]
        assert result.token_ids == want_tokens, f"request {i} ({name}) differs from PEFT"
        got = torch.stack(logits[f"r{i}"])
        assert got.shape == want_logits.shape
        diff = (got - want_logits).abs().max().item()
        assert diff <= 1e-3, f"request {i} ({name}): max logit difference {diff:.2e}"
        assert (result.adapter.name if result.adapter else None) == name
    assert joined_late and engine.scheduler.running == []
    assert engine.runner.kv.num_rows == 0


def test_adapters_change_the_output(peft_reference, tiny_model):
    """Guards the parity test against vacuous adapters: on the same prompt, every adapter's
    first-step logits differ clearly from the base model's."""
    for (name, prompt), (_, want_logits) in zip(_prompts(), peft_reference):
        if name is None:
            continue
        with torch.no_grad():
            base = tiny_model(torch.tensor([prompt], device=tiny_model.device)).logits[0, -1]
        assert (base - want_logits[0]).abs().max().item() > 0.5, name
