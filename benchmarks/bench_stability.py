"""Gradient norm at initialisation vs sequence length, every variant side by side (float64, CPU).

    python benchmarks/bench_stability.py [--lengths 128 256 512 1024] [--set memory.momentum=false ...]

A model whose outer gradient grows with N at initialisation (the inner dynamics expanding instead of
forgetting) trains with clipped, noisy gradients at long contexts. Prints |dL/d embedding| per variant and
length, and its growth from the shortest length; ``--set`` changes the model config (ablations), e.g.
``--set memory.theta_max=0.01 memory.forgetting=false``.
"""

from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf

from titans_scale.config import ConfigError, parse_overrides, to_dataclass
from titans_scale.models import VARIANTS, ModelConfig, build_model


def model_config(variant: str, args) -> ModelConfig:
    """The small model of this benchmark with ``--set`` applied through the recipe schema (typed, one-line
    errors with suggestions, as on the launcher's command line)."""
    base = OmegaConf.create(dict(
        variant=variant, vocab_size=256, dim=args.dim, n_layers=args.layers, n_heads=4, persistent_tokens=4,
        segment_len=args.window, window=args.window, memory=dict(depth=2, expansion=4, chunk_size=16),
    ))
    try:
        return to_dataclass(ModelConfig, OmegaConf.merge(base, parse_overrides(args.set)), prefix="model.")
    except ConfigError as e:
        raise SystemExit(f"--set: {e}") from None


def embedding_gradient(cfg: ModelConfig, n: int) -> float:
    torch.manual_seed(0)
    model = build_model(cfg).double()
    tokens = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    model.loss(tokens).backward()
    return model.embed.weight.grad.norm().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--window", type=int, default=128, help="SWA window and MAC segment")
    parser.add_argument("--set", nargs="*", default=[], help="model config overrides, key=value (memory.theta_max=0.01)")
    args = parser.parse_args()
    configs = {v: model_config(v, args) for v in args.variants}
    print(f"# |dL/d embedding| at initialisation, float64, dim {args.dim}, {args.layers} layers, window/segment "
          f"{args.window}, memory {configs[args.variants[0]].memory}")
    print(f"{'N':>6} " + " ".join(f"{v:>11}" for v in args.variants))
    grads = {}
    for n in args.lengths:
        grads[n] = {v: embedding_gradient(configs[v], n) for v in args.variants}
        print(f"{n:>6} " + " ".join(f"{grads[n][v]:>11.3g}" for v in args.variants), flush=True)
    first, last = args.lengths[0], args.lengths[-1]
    print(f"growth |g({last})| / |g({first})|: " + ", ".join(f"{v} {grads[last][v] / grads[first][v]:.3g}" for v in args.variants))


if __name__ == "__main__":
    main()
