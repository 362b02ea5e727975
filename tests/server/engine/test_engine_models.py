"""Other decoder families run through the same runner (Llama, Mistral with a sliding
window, Qwen3 with q/k norms) with PEFT parity; unsupported types are refused by name."""
from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from adapterctl.errors import FailedPrecondition

PROMPTS = [[5, 17, 300, 42, 8, 99, 1000, 7] * 3, [11, 12, 13], [400, 3, 3, 800, 21]]


def _tiny(kind: str):
    import transformers

    common = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif kind == "mistral":
        config = transformers.MistralConfig(sliding_window=16, **common)
        cls = transformers.MistralForCausalLM
    else:
        config = transformers.Qwen3Config(head_dim=16, **common)
        cls = transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen3"])
def test_family_matches_hf_and_peft(kind, tmp_path, tiny_tokenizer, save_adapter, collect, request_for):
    from peft import PeftModel

    from adapterctl.basemodel import resolve_base_model
    from adapterctl.server.cache.loaded import load_peft_dir
    from adapterctl.server.cache.memory import MemoryStore
    from adapterctl.server.engine.config import EngineConfig
    from adapterctl.server.engine.engine import BatchingEngine
    from adapterctl.server.types import ServedAdapter

    model = _tiny(kind)
    model.save_pretrained(str(tmp_path / "base"))
    base = resolve_base_model(str(tmp_path / "base"), progress=False)
    adir = save_adapter(model, tmp_path / "ad", seed=3, r=8, lora_alpha=16, target_modules="all-linear")
    store = MemoryStore({"ad": load_peft_dir(adir, base, 64, served=ServedAdapter("ad", 1, "sha256:" + "1" * 64))})
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adir)).eval()
    want = []
    for adapter, prompt in [(None, p) for p in PROMPTS] + [("ad", p) for p in PROMPTS]:
        ref = peft_model if adapter else model
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        want.append(out[0, len(prompt):].tolist())
    engine = BatchingEngine(base, store, EngineConfig(device="cpu", dtype="float32", max_prompt_tokens=64,
                                                      max_new_tokens_limit=64, max_running_requests=8,
                                                      max_batch_tokens=32),
                            model=copy.deepcopy(model), tokenizer=tiny_tokenizer)
    engine._eos = set()

    async def scenario():
        await engine.start()
        try:
            reqs = [request_for(p, 20, a) for a, p in [(None, p) for p in PROMPTS] + [("ad", p) for p in PROMPTS]]
            return await asyncio.gather(*(collect(engine, r) for r in reqs))
        finally:
            await engine.stop()

    got = [r.token_ids for _, r in asyncio.run(asyncio.wait_for(scenario(), 120))]
    assert got == want


def test_unsupported_model_type_is_refused_by_name():
    import transformers

    from adapterctl.server.engine.runner import ModelRunner

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128))
    with pytest.raises(FailedPrecondition, match="'gpt2'"):
        ModelRunner(model, max_rows=2, max_positions=64, num_slots=1, max_rank=8, lora_modules=("q_proj",))
