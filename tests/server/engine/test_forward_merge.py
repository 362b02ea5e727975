"""``Forward.absorb``: a prefill that arrives while another is in its layers runs the layers
the other has run, then rides along in it. Each chunk must come out as it does alone, with
LoRA slots re-ordered so that equal slots stay adjacent across the two forwards."""
from __future__ import annotations

import pytest
import torch

from adapterctl.server.engine.runner import Chunk, ModelRunner

PROMPTS = {"a": [2, 5, 9, 11, 4, 7], "b": [2, 7, 3], "c": [2, 8, 8, 6, 1], "d": [2, 4]}


def _runner(tiny_base, loaded_adapters, gemm: str = "auto") -> ModelRunner:
    from adapterctl.basemodel import load_model

    runner = ModelRunner(load_model(tiny_base, "cpu", "float32"), max_rows=4, max_positions=32, num_slots=2,
                         max_rank=8, lora_modules=("q_proj", "k_proj", "v_proj", "o_proj"), gemm=gemm)
    runner.bank.write(1, loaded_adapters["r4-qv"])
    runner.bank.write(2, loaded_adapters["r8-qkvo"])
    return runner


def _finish(fwd) -> dict[int, torch.Tensor]:
    while fwd.step():
        pass
    return {c.row: fwd.logits[i] for i, c in enumerate(fwd.chunks)}


def _chunks(runner, spec: list[tuple[str, int]]) -> list[Chunk]:
    return [Chunk(runner.kv.alloc_row(16), 0, PROMPTS[name], slot, True) for name, slot in spec]


@pytest.mark.parametrize("gemm", ["auto", "torch"])
@pytest.mark.parametrize("at_layer", [1, "last", "all"])
def test_a_merged_prefill_computes_what_each_chunk_computes_alone(tiny_base, loaded_adapters, gemm, at_layer):
    """Forward X (slots 2, 0) runs some layers; Y (slots 1, 2) catches up and is absorbed. Every
    row's logits match the same chunk prefilled alone, and the merged chunks are grouped by slot
    (X's first within a slot), which LoraBatch requires."""
    alone: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, slot in (("a", 2), ("b", 0), ("c", 1), ("d", 2)):
            runner = _runner(tiny_base, loaded_adapters, gemm)
            alone[name] = _finish(runner.start(_chunks(runner, [(name, slot)])))[0]

        runner = _runner(tiny_base, loaded_adapters, gemm)
        x = _chunks(runner, [("a", 2), ("b", 0)])
        y = _chunks(runner, [("c", 1), ("d", 2)])
        n = len(runner.layers)
        layer = {1: 1, "last": n - 1, "all": n}[at_layer]
        fwd = runner.start(x)
        fwd.run_to(layer)
        joining = runner.start(y)
        joining.run_to(layer)
        assert fwd.layer == joining.layer == layer and fwd.in_layers
        fwd.absorb(joining)
        assert [c.slot for c in fwd.chunks] == [0, 1, 2, 2]
        assert [c.row for c in fwd.chunks] == [x[1].row, y[0].row, x[0].row, y[1].row]
        merged = _finish(fwd)
    rows = {"a": x[0].row, "b": x[1].row, "c": y[0].row, "d": y[1].row}
    for name, row in rows.items():
        torch.testing.assert_close(merged[row], alone[name], rtol=0, atol=1e-4, msg=f"chunk {name}")
        assert int(merged[row].argmax()) == int(alone[name].argmax())


def test_absorb_refuses_forwards_at_different_layers(tiny_base, loaded_adapters):
    with torch.inference_mode():
        runner = _runner(tiny_base, loaded_adapters)
        fwd = runner.start(_chunks(runner, [("a", 1)]))
        fwd.run_to(2)
        other = runner.start(_chunks(runner, [("b", 0)]))
        other.run_to(1)
        with pytest.raises(RuntimeError, match="same layer"):
            fwd.absorb(other)
        _finish(fwd)
        other.run_to(2)
        with pytest.raises(RuntimeError, match="in their layers"):
            fwd.absorb(other)
