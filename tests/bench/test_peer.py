"""``bench/peer.py`` without vLLM: the ratio / median / agreement logic on synthetic
per-run results, and adapterctl's side of the workload run as its own process on the
tiny model, checked against stock HF / PEFT greedy decoding."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from bench.peer import KEYS, agreement, child, cpu_info, summarize, table


def _run(system: str, dtype: str, rnd: int, rates: dict[str, float], tokens: dict[str, list[list[int]]]) -> dict:
    return {"system": system, "dtype": dtype, "round": rnd,
            "runs": {w: {"tok_s": rates[w], "tokens": tokens[w]} for w in rates}}


def test_agreement_counts_identical_requests_and_common_prefixes():
    assert agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]) == {"identical": 1.0, "prefix": 1.0}
    got = agreement([[1, 2, 3, 4], [4, 5, 6, 7]], [[1, 2, 3, 4], [4, 9, 6, 7]])
    assert got["identical"] == 0.5
    assert got["prefix"] == pytest.approx((1 + 1 / 4) / 2)
    assert agreement([[7, 8]], [[9, 8]]) == {"identical": 0.0, "prefix": 0.0}
    with pytest.raises(ValueError):
        agreement([[1]], [[1], [2]])


def test_summarize_takes_the_median_of_per_round_ratios():
    same = {"base": [[1, 2], [3, 4]], "mixed": [[5, 6], [7, 8]], "single": [[9, 9, 9]]}
    vllm_tokens = {"base": [[1, 2], [3, 0]], "mixed": [[5, 6], [7, 8]], "single": [[9, 0, 9]]}
    results = []
    # adapterctl ÷ vLLM per round, mixed fp32: 2.0, 1.0, 4.0 -> median 2.0 (not the ratio of medians 1.5)
    for rnd, (a_mixed, v_mixed) in enumerate([(100, 50), (60, 60), (120, 30)]):
        results.append(_run("adapterctl", "float32", rnd, {"base": 90, "mixed": a_mixed, "single": 10}, same))
        results.append(_run("vllm", "float32", rnd, {"base": 100 + 10 * rnd, "mixed": v_mixed, "single": 20},
                            vllm_tokens))
    results.append(_run("adapterctl", "bfloat16", 0, {"base": 80, "mixed": 70, "single": 12}, same))
    results.append({"system": "vllm", "dtype": "bfloat16", "round": 0, "error": "timed out after 900 s"})
    summary = summarize(results)
    assert summary["vs_vllm_mixed_fp32"] == pytest.approx(2.0)
    assert summary["vs_vllm_base_fp32"] == pytest.approx(90 / 110)
    assert summary["vs_vllm_single_fp32"] == pytest.approx(0.5)
    assert summary["tok_s"]["mixed_fp32"] == {"adapterctl": [60, 100, 120], "vllm": [30, 50, 60]}
    assert summary["agreement"]["base_fp32"] == {"identical": 0.5, "prefix": 0.75}
    assert summary["agreement"]["single_fp32"] == {"identical": 0.0, "prefix": pytest.approx(1 / 3)}
    for key in ("vs_vllm_mixed_bf16", "vs_vllm_base_bf16", "vs_vllm_single_bf16"):
        assert summary[key] is None
    assert "vllm: timed out after 900 s" in summary["skipped"]["mixed_bf16"]
    assert set(KEYS) <= set(summary)
    assert "2.000" in table(summary) and "timed out" in table(summary)


def test_summarize_pairs_only_rounds_where_both_finished():
    t = {"base": [[1]], "mixed": [[1]], "single": [[1]]}
    results = [_run("adapterctl", "float32", 0, {"base": 10, "mixed": 10, "single": 1}, t),
               _run("vllm", "float32", 0, {"base": 5, "mixed": 5, "single": 1}, t),
               _run("adapterctl", "float32", 1, {"base": 99, "mixed": 99, "single": 9}, t),
               {"system": "vllm", "dtype": "float32", "round": 1, "error": "exit 1: boom"}]
    assert summarize(results)["vs_vllm_base_fp32"] == pytest.approx(2.0)


def test_cpu_info_names_the_model_and_flags():
    info = cpu_info()
    assert info["cpu_model"] and info["cpu_model"] != "unknown"
    assert set(info["cpu_isa"]) <= set(info["cpu_flags"].split())


def _greedy(model, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_adapterctl_side_runs_the_workload_on_the_tiny_model(tiny_base, tmp_path):
    from peft import PeftModel

    from adapterctl.basemodel import load_model, load_tokenizer
    from bench.common import prompts, random_adapters, template_adapter

    model = load_model(tiny_base, device="cpu")
    template = template_adapter(model, tmp_path / "template", 16, ["q_proj", "v_proj"])
    dirs = random_adapters(template, tmp_path / "adapters", "a", 3, seed=1)
    tok = load_tokenizer(tiny_base)
    workload = {"model": str(tiny_base.path), "prompts": prompts(tok, 3, 16, 32, seed=1),
                "single_prompt": prompts(tok, 1, 16, 32, seed=5)[0], "new_tokens": 6, "single_new_tokens": 9,
                "adapters": [str(d) for d in dirs], "max_lora_rank": 16, "max_model_len": 512, "max_batch_tokens": 2048}
    path = tmp_path / "workload.json"
    path.write_text(json.dumps(workload))

    result = child("adapterctl", "", path, "float32", tmp_path / "out.json", 600, tmp_path / "child.log")

    assert "error" not in result, (tmp_path / "child.log").read_text()[-3000:]
    assert result["system"] == "adapterctl" and result["dtype"] == "float32"
    runs = result["runs"]
    assert [len(t) for t in runs["base"]["tokens"]] == [6, 6, 6]
    assert [len(t) for t in runs["mixed"]["tokens"]] == [6, 6, 6]
    assert [len(t) for t in runs["single"]["tokens"]] == [9]
    assert all(runs[w]["tok_s"] > 0 for w in runs)
    # ignore_eos: HF stops at an end token, the engine goes on, so HF's output is a prefix.
    for prompt, got in zip(workload["prompts"], runs["base"]["tokens"]):
        want = _greedy(model, prompt, 6)
        assert got[: len(want)] == want
    want = _greedy(model, workload["single_prompt"], 9)
    assert runs["single"]["tokens"][0][: len(want)] == want
    assert [len(t) for t in runs["single_adapter"]["tokens"]] == [9]
    first = PeftModel.from_pretrained(copy.deepcopy(model), str(dirs[0])).eval()
    want = _greedy(first, workload["single_prompt"], 9)
    assert runs["single_adapter"]["tokens"][0][: len(want)] == want
    for prompt, got, d in zip(workload["prompts"], runs["mixed"]["tokens"], dirs):
        peft = PeftModel.from_pretrained(copy.deepcopy(model), str(d)).eval()
        want = _greedy(peft, prompt, 6)
        assert got[: len(want)] == want, f"adapter {d.name}"
