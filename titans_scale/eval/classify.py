"""Accuracy of a sequence classifier (``task=classify``) on a GenomicsBenchmarks-style split: the test
folder of the data it was trained on, or any folder with the same class subfolders."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from .errors import EvalError

LANGUAGE_MODEL = False  # the DNA tokenizer comes with the model file; no reading window


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None,
                        help="data set directory with <split>/<class>/ folders (default: the one the model was trained on)")
    parser.add_argument("--split", default="test", help="which split folder to score (default test)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass")


@torch.no_grad()
def predict(model, sequences, batch_size: int, device: torch.device) -> np.ndarray:
    """The predicted class of every sequence of a ``TokenSequences``."""
    out = []
    for first in range(0, len(sequences), batch_size):
        tokens, lengths, _ = sequences.batch(np.arange(first, min(len(sequences), first + batch_size)))
        out.append(model(tokens.to(device), lengths.to(device)).argmax(-1).cpu().numpy())
    return np.concatenate(out)


def run(args: argparse.Namespace) -> dict:
    from titans_scale.config import to_dataclass
    from titans_scale.data.dna import dna_tokenizer
    from titans_scale.tasks.classify import data_dir, encode
    from titans_scale.tasks.config import ClassifyConfig

    from .checkpoint import load_checkpoint, model_path, model_task, resolve_device
    from .results import format_table, log_to_wandb, output_dir, percent, write_json

    path = model_path(args.checkpoint)
    _, task_config = model_task(path, expected="classify")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size {args.batch_size} must be >= 1")
    c = to_dataclass(ClassifyConfig, {k: task_config[k] for k in ("data_dir", "val_fraction", "pooling", "init_from",
                                                                   "generated")}, prefix="classify.")
    root = Path(args.data) if args.data else data_dir(c)
    classes = task_config["classes"]
    tokenizer = dna_tokenizer(task_config["tokenizer"])  # the DNA tokenizer (rebuilt if it was removed)
    device = resolve_device(args.device)
    model, _ = load_checkpoint(path, device, args.dtype)
    started = time.perf_counter()
    sequences, _ = encode(root / args.split, tokenizer, task_config["seq_len"], classes)
    predicted = predict(model, sequences, args.batch_size, device)
    correct = predicted == sequences.labels
    per_class = {name: float(correct[sequences.labels == i].mean()) for i, name in enumerate(classes)}
    record = {"task": "classify", "checkpoint": str(path), "data": str(root / args.split), "sequences": len(correct),
              "accuracy": float(correct.mean()), "per_class": per_class,
              "seconds": round(time.perf_counter() - started, 3)}
    print(f"{path}: {len(correct)} sequences of {root / args.split}")
    print(format_table("class", [*classes, "all"], ["sequences", "accuracy %"],
                       [[str(int((sequences.labels == i).sum())), percent(per_class[name])] for i, name in enumerate(classes)]
                       + [[str(len(correct)), percent(record["accuracy"])]]))
    print(f"accuracy {100 * record['accuracy']:.2f}%")
    out = output_dir(args.out, path)
    print(f"wrote {write_json(out / 'classify.json', record)}")
    log_to_wandb(args.wandb, out, "classify", {"accuracy": record["accuracy"]}, config=record, model_file=path,
                 project=args.wandb_project)
    return record
