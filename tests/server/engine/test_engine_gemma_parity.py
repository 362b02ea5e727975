"""The same PEFT parity on the real Gemma 3 270M: a briefly trained rank-16 q/v adapter,
a random all-linear rsLoRA adapter and base rows in one batch (one request joining
mid-way, one prompt longer than the 512-token sliding window): identical greedy tokens
and per-step logits within 1e-3 of stock PEFT batch-of-one generate."""
from __future__ import annotations

import asyncio
import copy

import pytest
import torch

pytestmark = pytest.mark.slow
MAX_NEW = 10


def _train_two_steps(model, tokenizer, out):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    )
    batch = tokenizer(["The movie was wonderful, a joy from start to end.",
                       "A dull, lifeless film that I would not recommend."], return_tensors="pt", padding=True)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    peft_model.train()
    for _ in range(2):
        loss = peft_model(**batch, labels=batch.input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(str(out))
    return out


def _random_rslora(model, out):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                use_rslora=True, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(str(out))
    return out


def test_real_gemma_mixed_batch_matches_peft(gemma_base, tmp_path, request_for):
    from peft import PeftModel

    from adapterctl.basemodel import load_model, load_tokenizer
    from adapterctl.server.cache.loaded import load_peft_dir
    from adapterctl.server.cache.memory import MemoryStore
    from adapterctl.server.engine.config import EngineConfig
    from adapterctl.server.engine.engine import BatchingEngine
    from adapterctl.server.types import ServedAdapter

    model = load_model(gemma_base, device="cpu")
    tok = load_tokenizer(gemma_base)
    dirs = {
        "trained": _train_two_steps(model, tok, tmp_path / "trained"),
        "rslora": _random_rslora(model, tmp_path / "rs"),
    }
    loaded = {n: load_peft_dir(d, gemma_base, 64, served=ServedAdapter(n, 1, "sha256:" + str(i) * 64))
              for i, (n, d) in enumerate(dirs.items())}
    long_prompt = tok("word " * 600).input_ids[:560]
    jobs = [(None, tok("The capital of France is").input_ids), ("trained", tok("I watched the movie and").input_ids),
            ("rslora", tok("Once upon a time").input_ids), (None, long_prompt),
            ("trained", tok("Review: the plot").input_ids)]  # the last one joins mid-way
    want = []
    for name, prompt in jobs:
        ref = model if name is None else PeftModel.from_pretrained(copy.deepcopy(model), str(dirs[name])).eval()
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
        want.append((out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits)[:, 0]))

    engine = BatchingEngine(gemma_base, MemoryStore(loaded),
                            EngineConfig(device="cpu", dtype="float32", max_batch_tokens=256),
                            model=model, tokenizer=tok)
    logits: dict[str, list[torch.Tensor]] = {}
    engine.logits_hook = lambda seqs, rows: [logits.setdefault(s.request.request_id, []).append(r.clone())
                                             for s, r in zip(seqs, rows)]

    async def scenario():
        await engine.start()
        try:
            joined = asyncio.Event()

            async def one(i):
                name, prompt = jobs[i]
                if i == len(jobs) - 1:
                    await joined.wait()
                async for item in engine.generate(request_for(prompt, MAX_NEW, name, rid=str(i))):
                    if hasattr(item, "finish_reason"):
                        return item
                    if i == 0:
                        joined.set()

            return await asyncio.gather(*(one(i) for i in range(len(jobs))))
        finally:
            await engine.stop()

    results = asyncio.run(asyncio.wait_for(scenario(), 600))
    for i, (result, (tokens, ref_logits)) in enumerate(zip(results, want)):
        assert result.token_ids == tokens, f"request {i} ({jobs[i][0]})"
        diff = (torch.stack(logits[str(i)]) - ref_logits).abs().max().item()
        assert diff <= 1e-3, f"request {i} ({jobs[i][0]}): max logit difference {diff:.2e}"
