"""Options every evaluation command shares, and opening the model they name."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import DTYPES, load_checkpoint, load_tokenizer, model_path, resolve_device
from .errors import EvalError
from .inference import DEFAULT_WINDOW
from .results import WANDB_MODES, output_dir


def add_model_args(parser: argparse.ArgumentParser, language: bool = True) -> None:
    """The options that name the model; ``language``: also its tokenizer and reading window (language models)."""
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", required=True, help="model.pt written by a finished run, or its run directory")
    if language:
        group.add_argument("--tokenizer", default=None,
                           help="sentencepiece .model (default: the one the run's recipe names)")
    group.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:N")
    group.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and activations")
    if language:
        group.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                           help="tokens per model call; the memory state carries across calls, so results do not "
                                "depend on it (up to rounding): it only bounds activation memory")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", default=None, help="result directory (default: eval/ beside the model file)")
    group.add_argument("--wandb", nargs="?", const="offline", default="off", choices=WANDB_MODES,
                       help="log to Weights & Biases: --wandb (offline, files in OUT/wandb) or --wandb online")
    group.add_argument("--wandb-project", default=None, help="wandb project (default: titans_scale)")


@dataclass
class LoadedModel:
    """A model ready to evaluate: weights, config, tokenizer, and where it came from."""

    model: nn.Module
    cfg: object
    tokenizer: object
    path: Path
    device: torch.device
    window: int | None


def open_model(args: argparse.Namespace) -> LoadedModel:
    """The model, tokenizer and device an evaluation command names (checked before any heavy work)."""
    if args.window is not None and args.window < 1:
        raise EvalError(f"--window {args.window} must be >= 1 (tokens per model call)")
    path = model_path(args.checkpoint)
    device = resolve_device(args.device)
    model, cfg = load_checkpoint(path, device, args.dtype)
    tokenizer = load_tokenizer(path, args.tokenizer, cfg.vocab_size)
    return LoadedModel(model, cfg, tokenizer, path, device, args.window)


def results_dir(args: argparse.Namespace, loaded: LoadedModel) -> Path:
    return output_dir(args.out, loaded.path)


def parse_int_list(text: str, what: str) -> list[int]:
    """'1k,2k,4096' -> [1024, 2048, 4096] (k = 1024, m = 1024^2), each >= 0."""
    values = []
    for item in filter(None, (s.strip().lower() for s in text.split(","))):
        scale = {"k": 1024, "m": 1024 * 1024}.get(item[-1], 1)
        digits = item[:-1] if scale > 1 else item
        try:
            value = int(float(digits) * scale)
        except ValueError:
            raise EvalError(f"{what} {text!r}: {item!r} is not a number (e.g. 1k,4k,16384)") from None
        if value < 0:
            raise EvalError(f"{what} {text!r}: {item!r} must be >= 0")
        values.append(value)
    if not values:
        raise EvalError(f"{what} {text!r} names no value (e.g. 1k,4k,16k)")
    return values
