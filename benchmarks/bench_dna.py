"""DNA classification with a long-range dependence: Titans variants vs sliding-window attention of the same window.

    python benchmarks/bench_dna.py [--models lmm mal swa] [--steps 300] [--length 128]

The generated task (data/dna.py MotifTask): random bases with a motif slot in the first length / 8 bases and
one in the last length / 8 + 8, each holding motif M or another; the class is how many hold M (none, one,
two). Every model has 2 layers and the window of recipe ``dna_classify`` (32 bases), and classifies from its
last base: there SWA reaches 2 x 31 bases back, short of the start slot (at least 88 bases back at length
128), so it can score at most 50%; a memory can carry the start to the end. Each row is one run of the recipe through the launcher and the ``eval classify`` command.
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
    parser.add_argument("--length", type=int, default=128, help="bases per sequence (data.seq_len follows)")
    parser.add_argument("--nproc", type=int, default=2, help="data-parallel workers per run")
    parser.add_argument("--out", default=None, help="run directories (default: a temporary directory)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        print(f"# long-range motif task, {args.length} bases, 2 layers, window 32; {args.steps} steps of 32 "
              f"sequences, {args.nproc} workers; test accuracy", flush=True)
        for model in args.models:
            record, cpu = train_and_eval(
                "dna_classify", [f"model.variant={model}", f"train.steps={args.steps}", f"nproc={args.nproc}",
                                 f"data.seq_len={args.length}", f"classify.generated.length={args.length}",
                                 f"train.global_batch_tokens={32 * args.length}"],
                root / model, "classify", [])
            rows.append((model, record, cpu))
            print(f"#   {model:<12} accuracy {100 * record['accuracy']:.1f}% ({cpu / 60:.1f} CPU min)", flush=True)
    classes = list(rows[0][1]["per_class"])
    print("| model | test accuracy % | " + " | ".join(f"class {c} %" for c in classes) + " | CPU min |")
    print("|---" * (3 + len(classes)) + "|")
    for model, record, cpu in rows:
        per = " | ".join(f"{100 * record['per_class'][c]:.1f}" for c in classes)
        print(f"| {model} | {100 * record['accuracy']:.1f} | {per} | {cpu / 60:.1f} |")


if __name__ == "__main__":
    main()
