"""Do the Titans variants learn better than the baselines? Every variant trained for equal tokens, side by side.

    python benchmarks/bench_learning.py                      # language modelling at 1K + the recall table
    python benchmarks/bench_learning.py --quick              # smoke test: a few steps of each, small sizes
    python benchmarks/bench_learning.py --skip-recall --set model.memory.ln_init=unit_rms model.memory.ln_eps=1e-5

Language modelling: each variant's small CPU recipe (``recipes/<variant>.yaml``: dim 128, 2 layers, window 64,
depth-2 memory) on the bundled corpus at ``--seq-len`` (1024) for ``--steps`` optimizer steps of the recipe's 4K
tokens, started through the launcher like any run (``python -m titans_scale.launch``); prints the validation
loss and perplexity at the end, tokens/s and wall time. Recall: each ``recipes/recall_<variant>.yaml`` (answers 4x
the attention span back) trained for ``--recall-steps``, then ``python -m titans_scale.eval recall``; ablations of
the memory (no momentum, no forgetting, depth 1) as extra rows for ``--ablate`` variants. ``--set`` applies to
every run (e.g. the paper's memory settings). Runs go to ``--out`` (default runs/bench_learning); a finished
run is not repeated (resume=auto), so a second call only reprints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("lmm", "mac", "mag", "mal", "transformer", "swa")
ABLATIONS = {"no momentum": ["model.memory.momentum=false"], "no forgetting": ["model.memory.forgetting=false"],
             "depth 1": ["model.memory.depth=1"]}
QUICK = ["model.dim=32", "model.n_heads=2", "model.n_layers=1", "train.warmup_steps=1", "train.eval_batches=1",
         "train.log_every=1", "train.checkpoint_every=0", "nproc=1"]


def launch(args: list[str], log: Path) -> float:
    """One run through the launcher (its output in ``log``); returns the wall time, or exits on failure."""
    started = time.time()
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-m", "titans_scale.launch", *args], cwd=ROOT, stdout=out,
                               stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if code:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"run failed ({' '.join(args[:2])}...): see {log}\n" + "\n".join(tail))
    return time.time() - started


def metrics(run_dir: Path) -> dict:
    """The last validation loss, the mean tokens/s of the steps and the tokens trained, from metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    val = [r for r in rows if "val_loss" in r]
    steps = [r for r in rows if "loss" in r]
    rates = [r["tokens_per_s"] for r in steps if r.get("tokens_per_s")]
    return {"val_loss": val[-1]["val_loss"], "first_val_loss": val[0]["val_loss"], "tokens": steps[-1]["tokens"],
            "tokens_per_s": sum(rates) / len(rates) if rates else float("nan"), "train_loss": steps[-1]["loss"]}


def parameters(log: Path) -> str:
    line = next((l for l in log.read_text().splitlines() if l.startswith("[setup]")), "")
    return line.split(" model, ")[1].split(" parameters")[0] if " model, " in line else "?"


def language_modelling(args, out: Path) -> list[dict]:
    rows = []
    for variant in args.variants:
        run_dir = out / f"lm_{variant}"
        run_dir.mkdir(parents=True, exist_ok=True)
        overrides = [f"recipe={variant}", f"run_dir={run_dir}", f"data.seq_len={args.seq_len}", f"train.steps={args.steps}",
                     f"train.micro_batch={args.micro_batch}", "train.sample_tokens=0", "wandb.mode=disabled",
                     f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}", *(QUICK if args.quick else []),
                     *args.set]
        wall = launch(overrides, run_dir / "launch.log")
        rows.append({"variant": variant, "params": parameters(run_dir / "launch.log"), "wall": wall, **metrics(run_dir)})
        r = rows[-1]
        print(f"  {variant}: val loss {r['val_loss']:.4f} (ppl {math.exp(r['val_loss']):.1f}) after {r['tokens']} tokens, "
              f"{wall:.0f} s", flush=True)
    return rows


def recall(args, out: Path) -> list[dict]:
    rows = []
    runs = [(v, "", []) for v in args.variants] + [(v, name, extra) for v in args.ablate for name, extra in ABLATIONS.items()]
    for variant, ablation, extra in runs:
        run_dir = out / f"recall_{variant}{'_' + ablation.replace(' ', '_') if ablation else ''}"
        run_dir.mkdir(parents=True, exist_ok=True)
        overrides = [f"recipe=recall_{variant}", f"run_dir={run_dir}", f"train.steps={args.recall_steps}", "wandb.mode=disabled",
                     f"train.eval_every={args.recall_steps}", f"train.checkpoint_every={args.recall_steps}",
                     *(QUICK if args.quick else []), *extra, *args.set]
        wall = launch(overrides, run_dir / "launch.log")
        subprocess.check_call([sys.executable, "-m", "titans_scale.eval", "recall", "--checkpoint", str(run_dir),
                               "--samples", str(args.recall_samples), "--out", str(run_dir / "eval")], cwd=ROOT,
                              stdout=subprocess.DEVNULL)
        result = json.loads((run_dir / "eval" / "recall.json").read_text())
        rows.append({**result, "variant": variant + (f" ({ablation})" if ablation else ""), "wall": wall})
        print(f"  {rows[-1]['variant']}: recall {100 * result['accuracy']:.1f}% (chance {100 * result['chance']:.1f}%), "
              f"{wall:.0f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of 4096 tokens per variant")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per worker (2 workers x 2 x 1024 = 4096)")
    parser.add_argument("--recall-steps", type=int, default=300)
    parser.add_argument("--recall-samples", type=int, default=128)
    parser.add_argument("--ablate", nargs="*", default=["mag"], choices=VARIANTS, help="variants with memory ablation rows")
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--skip-recall", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every run, key=value")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_learning"))
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 steps of tiny models, 1 worker")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.recall_steps, args.seq_len, args.micro_batch, args.recall_samples = 3, 3, 256, 2, 8
        args.ablate = args.ablate[:1]
    out = Path(args.out)
    started = time.time()
    settings = f"--set {' '.join(args.set)}" if args.set else "the recipes' defaults"
    if not args.skip_lm:
        print(f"# language modelling: bundled corpus, seq_len {args.seq_len}, {args.steps} steps x 4096 tokens per variant, "
              f"{settings}{' (quick)' if args.quick else ''}", flush=True)
        rows = language_modelling(args, out)
        print("| variant | params | val loss | val ppl | first val ppl | tokens | tok/s | wall s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['params']} | {r['val_loss']:.4f} | {math.exp(r['val_loss']):.1f} | "
                  f"{math.exp(r['first_val_loss']):.0f} | {r['tokens']} | {r['tokens_per_s']:.0f} | {r['wall']:.0f} |", flush=True)
    if not args.skip_recall:
        print(f"# recall: recipes/recall_<variant>.yaml, {args.recall_steps} steps, {args.recall_samples} validation "
              f"sequences, {settings}{' (quick)' if args.quick else ''}", flush=True)
        rows = recall(args, out)
        bins = max((len(r["by_distance"]) for r in rows), default=0)
        print("| variant | accuracy % | chance % | " + " | ".join(f"bin {i + 1}" for i in range(bins)) + " | wall s |")
        print("|---|---|---|" + "---|" * bins + "---|")
        for r in rows:
            cells = [f"{100 * b['accuracy']:.0f} ({b['from']}-{b['to']})" for b in r["by_distance"]]
            cells += [""] * (bins - len(cells))
            print(f"| {r['variant']} | {100 * r['accuracy']:.1f} | {100 * r['chance']:.1f} | " + " | ".join(cells) +
                  f" | {r['wall']:.0f} |", flush=True)
    print(f"# done in {time.time() - started:.0f} s; runs in {out}")


if __name__ == "__main__":
    main()
