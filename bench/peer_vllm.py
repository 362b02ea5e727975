"""vLLM's side of ``python -m bench.peer``: the peer workload on vLLM's offline ``LLM``.

Run by ``.venv-peer/bin/python`` (vLLM pins its own transformers), so it imports only the
standard library and vllm, never adapterctl. Reads the workload JSON written by
``bench/peer.py`` (model directory, prompt token ids, PEFT adapter directories) and writes
``{"system", "dtype", "runs": {workload: {"tok_s", "seconds", "tokens"}}, ...}`` to ``--out``
(stdout is vLLM's log). Workloads, all greedy with ``ignore_eos``:

  base    every prompt at once, no adapter;
  mixed   the same prompts, request i on adapter i (all resident after the warm-up);
  single  one prompt alone, ``single_new_tokens`` tokens, prefill included;
  single_adapter  the same through the first adapter.

vLLM spawns worker processes, hence the ``__main__`` guard.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Both cores for vLLM's worker; bench/peer.py sets these too (and wins), these make a
# standalone run match. Must be set before vllm is imported.
DEFAULT_ENV = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
               "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(workload: dict, dtype: str) -> dict:
    """Build the LLM (LoRA on, one slot per adapter), warm up, time each workload once."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    started = time.monotonic()
    adapters = workload["adapters"]
    llm = LLM(model=workload["model"], dtype=dtype, enable_lora=True, max_loras=len(adapters),
              max_lora_rank=workload["max_lora_rank"], max_num_seqs=max(len(workload["prompts"]), 1),
              max_model_len=workload["max_model_len"], max_num_batched_tokens=workload["max_batch_tokens"],
              enable_prefix_caching=False, seed=0, generation_config="vllm")
    load_s = time.monotonic() - started
    loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapters)]
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in workload["prompts"]]
    single = [TokensPrompt(prompt_token_ids=list(workload["single_prompt"]))]

    def timed(batch, new: int, lora=None) -> dict:
        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
        began = time.monotonic()
        outs = llm.generate(batch, params, lora_request=lora, use_tqdm=False)
        seconds = time.monotonic() - began
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        print(f"[peer_vllm] {len(batch)} requests x {new} tokens, lora={lora is not None}: {seconds:.2f} s",
              file=sys.stderr, flush=True)
        return {"tok_s": sum(map(len, tokens)) / seconds, "seconds": seconds, "tokens": tokens}

    new = workload["new_tokens"]
    # Warm-up on short prompts (the first 4 tokens of each): kernels for both paths, and the
    # mixed one loads every adapter into its slot.
    short = [TokensPrompt(prompt_token_ids=list(p[:4])) for p in workload["prompts"]]
    timed(short, 2)
    timed(short, 2, loras[: len(prompts)])
    runs = {"base": timed(prompts, new), "mixed": timed(prompts, new, loras[: len(prompts)]),
            "single": timed(single, workload["single_new_tokens"]),
            "single_adapter": timed(single, workload["single_new_tokens"], loras[0])}
    import vllm

    return {"system": "vllm", "version": vllm.__version__, "dtype": dtype, "load_s": load_s, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, help="workload JSON written by bench/peer.py")
    parser.add_argument("--dtype", required=True, choices=("float32", "bfloat16"))
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    with open(args.workload) as fh:
        workload = json.load(fh)
    result = run(workload, args.dtype)
    with open(args.out, "w") as fh:
        json.dump(result, fh)
    print(f"vllm {args.dtype}: " + ", ".join(f"{k} {v['tok_s']:.1f} tok/s" for k, v in result["runs"].items()),
          file=sys.stderr)


if __name__ == "__main__":
    main()
