"""DNA classification with a long-range dependence: Titans variants vs sliding-window attention of the same window.

    python benchmarks/bench_dna.py [--models lmm mal swa] [--steps 300] [--length 256]

The generated task (data/dna.py MotifTask): random bases with one of two motifs in the first 32 and one in
the last 40; the class says whether they are the same motif. Every model has 2 layers and the window of
recipe ``dna_classify`` (64 bases): at the last base, SWA reaches 2 x 63 bases back, short of the start
motif, so it can do no better than chance (50%); a memory carries the start across the sequence. Each row
is one run of the recipe through the launcher and the ``eval classify`` command (test accuracy).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from launched import train_and_eval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lmm", "mal", "swa"], help="model.variant values")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (32 sequences each)")
    parser.add_argument("--length", type=int, default=256, help="bases per sequence (data.seq_len follows)")
    parser.add_argument("--nproc", type=int, default=2, help="data-parallel workers per run")
    parser.add_argument("--out", default=None, help="run directories (default: a temporary directory)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        print(f"# long-range motif task, {args.length} bases, 2 layers, window 64; {args.steps} steps of 32 "
              f"sequences, {args.nproc} workers; test accuracy", flush=True)
        for model in args.models:
            record, cpu = train_and_eval(
                "dna_classify", [f"model.variant={model}", f"train.steps={args.steps}", f"nproc={args.nproc}",
                                 f"data.seq_len={args.length}", f"classify.generated.length={args.length}",
                                 f"train.global_batch_tokens={32 * args.length}"],
                root / model, "classify", [])
            rows.append((model, record, cpu))
            print(f"#   {model:<12} accuracy {100 * record['accuracy']:.1f}% ({cpu / 60:.1f} CPU min)", flush=True)
    print("| model | test accuracy % | same % | different % | CPU min |")
    print("|---|---|---|---|---|")
    for model, record, cpu in rows:
        per = record["per_class"]
        print(f"| {model} | {100 * record['accuracy']:.1f} | {100 * per['same']:.1f} | {100 * per['different']:.1f} | "
              f"{cpu / 60:.1f} |")


if __name__ == "__main__":
    main()
