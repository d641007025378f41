"""Gradient norm at initialisation vs sequence length, every variant side by side (float64, CPU).

    python benchmarks/bench_stability.py [--lengths 128 256 512 1024] [--set memory.momentum=false ...]

A model whose outer gradient grows with N at initialisation (the inner dynamics expanding instead of
forgetting) trains with clipped, noisy gradients at long contexts. Prints |dL/d embedding| per variant and
length, and its growth from the shortest length; ``--set`` changes the memory config (ablations), e.g.
``--set memory.theta_max=0.01 memory.forgetting=false``.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from titans_scale.memory import MemoryConfig
from titans_scale.models import ModelConfig, build_model

VARIANTS = ("transformer", "swa", "lmm", "mac", "mag", "mal")


def memory_config(settings: list[str]) -> MemoryConfig:
    cfg = MemoryConfig(depth=2, expansion=4, chunk_size=16)
    fields = {f.name: f.type for f in dataclasses.fields(MemoryConfig)}
    for item in settings:
        key, _, value = item.partition("=")
        name = key.removeprefix("memory.")
        if name not in fields:
            raise SystemExit(f"--set {item}: unknown memory key {name!r} (one of {', '.join(fields)})")
        current = getattr(cfg, name)
        parsed = value.lower() in ("1", "true", "yes") if isinstance(current, bool) else type(current)(value)
        cfg = dataclasses.replace(cfg, **{name: parsed})
    return cfg


def embedding_gradient(variant: str, n: int, memory: MemoryConfig, args) -> float:
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, vocab_size=256, dim=args.dim, n_layers=args.layers, n_heads=4,
                      persistent_tokens=4, segment_len=args.window, window=args.window, memory=memory)
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
    parser.add_argument("--set", nargs="*", default=[], help="memory config overrides, key=value")
    args = parser.parse_args()
    memory = memory_config(args.set)
    print(f"# |dL/d embedding| at initialisation, float64, dim {args.dim}, {args.layers} layers, window/segment "
          f"{args.window}, memory {memory}")
    print(f"{'N':>6} " + " ".join(f"{v:>11}" for v in args.variants))
    grads = {}
    for n in args.lengths:
        grads[n] = {v: embedding_gradient(v, n, memory, args) for v in args.variants}
        print(f"{n:>6} " + " ".join(f"{grads[n][v]:>11.3g}" for v in args.variants), flush=True)
    first, last = args.lengths[0], args.lengths[-1]
    print(f"growth |g({last})| / |g({first})|: " + ", ".join(f"{v} {grads[last][v] / grads[first][v]:.3g}" for v in args.variants))


if __name__ == "__main__":
    main()
