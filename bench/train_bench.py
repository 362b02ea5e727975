"""Training throughput: the seed recipe (stock PEFT + HF Trainer) vs ``adapterctl train``.

Both train the same base on examples/movie_reviews.jsonl with the same LoRA (r16/a32,
q_proj+v_proj, dropout 0.05), steps, batch, max sequence length, learning rate and seed.
The stock side fills the recipe's gaps the plain way: the same tokenization (text + EOS),
``DataCollatorForLanguageModeling(mlm=False)`` with right padding, default Trainer loss.
Throughput is non-padding tokens / summed optimizer-step wall time, step 1 (warm-up) excluded;
both runs draw the same batches, so step i of one run is timed against step i of the other.
``p6_train_over_stock`` is the median over steps of that paired ratio (stock step time /
adapterctl step time = tokens/s ratio on identical tokens), which a noisy neighbour on a
shared CPU cannot skew with one slow burst; ``p6_total_ratio`` is the plain total ratio.
Both sides use ``--threads`` torch threads (default 1): on an oversubscribed CPU, OpenMP
barriers make multi-threaded step times swing 5-10x, which drowns the comparison.

    python -m bench.train_bench [--quick] [--steps N] [--base-model ID]

Prints a table, then as its LAST line a JSON object with ``p6_train_over_stock``
(tokens/s ratio) and both final losses. ``run()`` returns the same dict for bench/run.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "movie_reviews.jsonl"


_WAIT_S = 1800.0  # bound on any lock-step wait


def _timer(lockstep: tuple[Any, Any, Any] | None = None):
    """A TrainerCallback recording each optimizer step's wall time in ``.steps``.

    ``lockstep = (start_barrier, my_turn, other_turn)``: both runs start stepping together
    and then alternate steps (stock 1, adapterctl 1, stock 2, ...), so only one computes at a
    time and a noisy neighbour slows both sides alike instead of whichever ran during it.
    """
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[float] = []
            self._t = 0.0

        def on_train_begin(self, args, state, control, **kw):
            if lockstep:
                lockstep[0].wait(_WAIT_S)

        def on_step_begin(self, args, state, control, **kw):
            if lockstep and not lockstep[1].acquire(timeout=_WAIT_S):
                raise RuntimeError("lock-step partner did not finish its step in time")
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(time.perf_counter() - self._t)
            if lockstep:
                lockstep[2].release()

    return StepTimer()


def final_loss(losses: list[float], window: int) -> float:
    tail = losses[-window:]
    return sum(tail) / len(tail)


def run_stock(base_path: str, steps: int, batch: int, max_len: int, lr: float, seed: int,
              lockstep: tuple[Any, Any, Any] | None = None) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )
    from transformers.trainer_callback import PrinterCallback

    tok = AutoTokenizer.from_pretrained(base_path)
    tok.padding_side = "right"
    texts = [json.loads(line)["text"] for line in DATA.read_text().splitlines() if line.strip()]
    dataset = [{"input_ids": (tok(t)["input_ids"] + [tok.eos_token_id])[:max_len]} for t in texts]
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.05, bias="none", task_type="CAUSAL_LM"))
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    tokens: list[int] = []  # non-padding tokens per batch, in the order the Trainer draws them

    def counting(features):
        out = collator(features)
        tokens.append(int(out["attention_mask"].sum()))
        return out

    timer = _timer(lockstep)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
                                 logging_steps=1, save_strategy="no", report_to="none", seed=seed, disable_tqdm=True,
                                 use_cpu=not torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=counting, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "step_tokens": tokens[:steps], "step_seconds": timer.steps}


def run_adapterctl(base_path: str, steps: int, batch: int, max_len: int, lr: float, seed: int,
                   lockstep: tuple[Any, Any, Any] | None = None) -> dict[str, Any]:
    from adapterctl.trainer import TrainConfig, train

    timer = _timer(lockstep)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=str(DATA), output=tmp, base_model=base_path, max_steps=steps, batch_size=batch,
                          max_seq_len=max_len, lr=lr, seed=seed, rank=16, alpha=32, dropout=0.05,
                          target_modules=["q_proj", "v_proj"], progress=False)
        result = train(cfg, callbacks=[timer])
    return {"losses": result.losses, "tokens": result.tokens, "step_seconds": timer.steps}


def run(quick: bool = False, steps: int | None = None, base_model: str | None = None, batch: int = 4,
        max_len: int = 128, lr: float = 2e-4, seed: int = 42, threads: int = 1) -> dict[str, Any]:
    """Train both ways, in two processes stepping alternately, and compare."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from adapterctl.basemodel import resolve_base_model

    base = resolve_base_model(base_model, progress=True)
    steps = steps or (4 if quick else 30)
    window = math.ceil(sum(1 for line in DATA.read_text().splitlines() if line.strip()) / batch)
    stock, ours = _run_lockstep(str(base.path), steps, batch, max_len, lr, seed, threads=threads)
    if ours["tokens"] != sum(stock["step_tokens"]):
        raise SystemExit(f"the two runs saw different tokens ({ours['tokens']} vs {sum(stock['step_tokens'])})")
    # Step 1 is warm-up; both runs see the same batches, so step i is compared with step i.
    tokens = sum(stock["step_tokens"][1:])
    rows = {}
    for name, r in (("stock", stock), ("adapterctl", ours)):
        seconds = sum(r["step_seconds"][1:])
        rows[name] = {"tokens_per_s": tokens / seconds, "seconds": seconds,
                      "final_loss": final_loss(r["losses"], window), "last_step_loss": r["losses"][-1]}
    paired = sorted(a / b for a, b in zip(stock["step_seconds"][1:], ours["step_seconds"][1:]))
    loss_gap = abs(rows["adapterctl"]["final_loss"] - rows["stock"]["final_loss"]) / rows["stock"]["final_loss"]
    return {
        "base_model": base.id, "steps": steps, "batch_size": batch, "max_seq_len": max_len, "seed": seed,
        "threads": threads,
        "tokens_timed": tokens, "stock": rows["stock"], "adapterctl": rows["adapterctl"],
        "p6_train_over_stock": paired[len(paired) // 2],
        "p6_total_ratio": rows["adapterctl"]["tokens_per_s"] / rows["stock"]["tokens_per_s"],
        "p6_stock_final_loss": rows["stock"]["final_loss"],
        "p6_adapterctl_final_loss": rows["adapterctl"]["final_loss"],
        "p6_final_loss_rel_diff": loss_gap,
    }


def _side(fn_name: str, args: tuple, lockstep: tuple, results: Any, threads: int) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        results.put((fn_name, globals()[fn_name](*args, lockstep=lockstep)))
    except BaseException as exc:  # report instead of leaving the partner waiting
        results.put((fn_name, {"error": repr(exc)}))
        lockstep[0].abort()
        lockstep[2].release()
        raise


def _run_lockstep(*args: Any, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each side in its own process (own RNG, own threads); see :func:`_timer`."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    stock_turn, ours_turn = ctx.Semaphore(1), ctx.Semaphore(0)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_side, args=("run_stock", args, (barrier, stock_turn, ours_turn), results, threads)),
        ctx.Process(target=_side, args=("run_adapterctl", args, (barrier, ours_turn, stock_turn), results, threads)),
    ]
    for proc in procs:
        proc.start()
    out: dict[str, Any] = {}
    deadline = time.monotonic() + _WAIT_S
    while len(out) < len(procs) and time.monotonic() < deadline:
        try:
            name, result = results.get(timeout=5)
            out[name] = result
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):  # a side died before reporting
                for proc in procs:
                    proc.kill()
                raise SystemExit(f"a benchmark process died (exit codes {[p.exitcode for p in procs]})")
    for proc in procs:
        proc.join(timeout=60)
    for name, result in out.items():
        if "error" in result:
            raise SystemExit(f"{name} failed: {result['error']}")
    return out["run_stock"], out["run_adapterctl"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 steps per side (about a minute on 2 free CPU cores)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--base-model", default=None, help="default gemma-3-270m")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per side (same for both; 1 keeps timings stable on shared CPUs)")
    args = parser.parse_args(argv)
    out = run(args.quick, args.steps, args.base_model, args.batch_size, args.max_seq_len, seed=args.seed,
              threads=args.threads)
    print(f"{'':12} {'tokens/s':>10} {'seconds':>9} {'final loss':>11} {'last step':>10}", file=sys.stderr)
    for name in ("stock", "adapterctl"):
        r = out[name]
        print(
            f"{name:12} {r['tokens_per_s']:10.1f} {r['seconds']:9.2f} {r['final_loss']:11.4f} "
            f"{r['last_step_loss']:10.4f}",
            file=sys.stderr,
        )
    print(f"tokens/s ratio adapterctl/stock: median paired step {out['p6_train_over_stock']:.3f}, "
          f"total {out['p6_total_ratio']:.3f}; "
          f"final loss rel. diff {out['p6_final_loss_rel_diff']:.2%}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
