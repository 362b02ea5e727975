"""Random-weight Gemma 3 base directories (config, safetensors, tokenizer, chat template).

Two shapes: the tests' tiny model (2 layers, hidden 64, the real 262k vocabulary) and a
model of Gemma 3 270M's own shape (``like``: its config.json), for a machine that lacks the
converted Gemma (the device check, bench/device_check.py): its speed does not depend on the
weights' values. Weights come from ``torch.manual_seed(seed)``; every matrix is scaled by
``scale`` so a random model's greedy choices are decisive, not near-ties.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def tiny_config():
    """The tests' tiny Gemma 3 text config (two layers: one sliding-window, one full)."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=262144, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, layer_types=["sliding_attention", "full_attention"], sliding_window=64,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )


def like(config_dir: Path):
    """The Gemma 3 text config in ``config_dir``/config.json (a converted base's, e.g. Gemma 3 270M)."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig.from_pretrained(str(config_dir))


def build(target: Path, tokenizer_dir: Path, config, seed: int = 0, scale: float = 4.0) -> Path:
    """Write a random-weight Gemma3ForCausalLM of ``config`` and the tokenizer (and chat template)
    of ``tokenizer_dir`` to ``target``, atomically (a temp folder beside it, then a rename)."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale) if p.dim() > 1 else None
    model.generation_config.eos_token_id = [1, 106]
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".random-"))
    model.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
