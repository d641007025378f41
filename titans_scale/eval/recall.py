"""Accuracy on the long-range synthetic tasks (associative recall, pass-key, selective copy) by distance.

    python -m titans_scale.eval recall --checkpoint runs/recall_mag [--samples 256] [--distance 256 ...]

The task, its items, distance and sequence length default to the ones the run trained on (``data.synthetic`` in
the run's config.yaml beside model.pt); any of them can be changed to test further than the training distance.
The samples are the task's validation split (``titans_scale.data.synthetic``: deterministic, never trained on).
An answer counts when the argmax of the model's next-token logits is the right token. Prints the accuracy in
distance bins (tokens between an answer and what it recalls) and writes recall.json and recall.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .errors import EvalError

BINS = 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=None, help="recall, passkey or copy (default: the run's data.synthetic.task)")
    parser.add_argument("--items", type=int, default=None, help="pairs / digits / tokens per sequence (default: the run's)")
    parser.add_argument("--distance", type=int, default=None, help="least distance of an answer (default: the run's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the run's data.seq_len)")
    parser.add_argument("--samples", type=int, default=None, help="sequences to score (default: the run's val_samples)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")


def task_of(args: argparse.Namespace, model_file: Path):
    """The task config, sequence length and vocabulary: the run's (config.yaml beside model.pt), with the
    command line's changes."""
    from omegaconf import OmegaConf

    from titans_scale.data.config import SyntheticConfig

    run_config = model_file.parent / "config.yaml"
    data = OmegaConf.load(run_config).data if run_config.is_file() else None
    base = SyntheticConfig(**OmegaConf.to_container(data.synthetic)) if data is not None and "synthetic" in data else SyntheticConfig()
    changes = {k: v for k, v in dict(task=args.task, items=args.items, distance=args.distance, val_samples=args.samples).items() if v is not None}
    cfg = SyntheticConfig(**{**base.__dict__, **changes})
    if not cfg.task:
        raise EvalError(f"{model_file} was not trained on a synthetic task ({run_config} names none); pass --task recall, passkey or copy")
    seq_len = args.seq_len or (data.seq_len if data is not None else None)
    if not seq_len:
        raise EvalError(f"no {run_config} to take the sequence length from; pass --seq-len")
    return cfg, seq_len


def evaluate(model, cfg, seq_len: int, vocab: int, *, batch_size: int, device) -> dict:
    """Correct answers and distances over ``cfg.val_samples`` validation sequences."""
    from titans_scale.data.synthetic import make_sample

    correct, distances = [], []
    model.eval()
    for first in range(0, cfg.val_samples, batch_size):
        samples = [make_sample(cfg, seq_len, vocab, "val", i) for i in range(first, min(first + batch_size, cfg.val_samples))]
        tokens = torch.from_numpy(np.stack([s.tokens for s in samples])).to(device)
        with torch.no_grad():
            logits, _ = model(tokens)
        predicted = logits.argmax(-1).cpu().numpy()
        for row, s in zip(predicted, samples):
            correct.append(row[s.positions] == s.answers)
            distances.append(s.distances)
    return {"correct": np.concatenate(correct), "distances": np.concatenate(distances)}


def by_distance(correct: np.ndarray, distances: np.ndarray, low: int, high: int) -> list[dict]:
    """Accuracy in BINS equal-width bins of distance from ``low`` to ``high``."""
    edges = np.linspace(low, high + 1, BINS + 1).round().astype(int)
    rows = []
    for a, b in zip(edges[:-1], edges[1:]):
        mask = (distances >= a) & (distances < b)
        if mask.any():
            rows.append({"from": int(a), "to": int(b - 1), "answers": int(mask.sum()), "accuracy": float(correct[mask].mean())})
    return rows


def run(args: argparse.Namespace) -> dict:
    from titans_scale.data.synthetic import alphabet_size, check_task
    from titans_scale.data.errors import DataError

    from .checkpoint import load_checkpoint, model_path, resolve_device
    from .results import format_table, log_to_wandb, output_dir, percent, write_json

    path = model_path(args.checkpoint)
    if args.batch_size < 1:
        raise EvalError(f"--batch-size {args.batch_size} must be >= 1")
    cfg, seq_len = task_of(args, path)
    device = resolve_device(args.device)
    model, model_cfg = load_checkpoint(path, device, args.dtype)
    try:
        check_task(cfg, seq_len, model_cfg.vocab_size, {})  # any distance may be asked of a trained model
    except DataError as err:
        raise EvalError(str(err)) from None
    result = evaluate(model, cfg, seq_len, model_cfg.vocab_size, batch_size=args.batch_size, device=device)
    correct, distances = result["correct"], result["distances"]
    rows = by_distance(correct, distances, int(distances.min()), int(distances.max()))
    chance = 1 / (10 if cfg.task == "passkey" else alphabet_size(model_cfg.vocab_size))
    accuracy = float(correct.mean())
    head = (f"{cfg.task}: items {cfg.items}, distance >= {cfg.distance}, seq_len {seq_len}, {cfg.val_samples} sequences, "
            f"{correct.size} answers | accuracy {percent(accuracy)}% (chance {percent(chance)}%) | {model_cfg.variant}, window "
            f"{model_cfg.window}, segment {model_cfg.segment_len}")
    print(head)
    print(format_table("distance", [f"{r['from']}-{r['to']}" for r in rows], ["answers", "accuracy %"],
                       [[str(r["answers"]), percent(r["accuracy"])] for r in rows]))
    out = output_dir(args.out, path)
    record = {"task": cfg.task, "checkpoint": str(path), "items": cfg.items, "distance": cfg.distance, "seq_len": seq_len,
              "samples": cfg.val_samples, "accuracy": accuracy, "chance": chance, "by_distance": rows,
              "variant": model_cfg.variant}
    json_path = write_json(out / "recall.json", record)
    png = accuracy_plot(out / "recall.png", rows, chance, f"{path.parent.name}: {cfg.task}, items {cfg.items}")
    print(f"wrote {json_path} and {png}")
    log_to_wandb(args.wandb, out, "recall", {"accuracy": accuracy}, config=record, images={"accuracy": png},
                 model_file=path, project=args.wandb_project)
    return record


def accuracy_plot(path: Path, rows: list[dict], chance: float, title: str) -> Path:
    """Accuracy against distance (the middle of each bin), with the chance level."""
    from .results import new_figure, save_figure

    fig, ax = new_figure(5.0, 3.2)
    ax.plot([(r["from"] + r["to"]) / 2 for r in rows], [100 * r["accuracy"] for r in rows], marker="o")
    ax.axhline(100 * chance, color="grey", linestyle="--", label="chance")
    ax.set_ylim(0, 100)
    ax.set_xlabel("distance (tokens)")
    ax.set_ylabel("accuracy %")
    ax.set_title(title, fontsize=10)
    ax.legend()
    return save_figure(fig, path)
