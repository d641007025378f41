"""Gradient norm at initialisation vs sequence length, every variant side by side (float64, CPU).

    python benchmarks/bench_stability.py [--lengths 512 1024 2048 4096] [--set memory.momentum=false ...]
    python benchmarks/bench_stability.py --lengths 4096 --dtypes float32 bf16     # agreement with float64

A model whose outer gradient grows with N at initialisation (the inner dynamics expanding instead of
forgetting) trains with clipped, noisy gradients at long contexts. Prints the norm of the whole gradient per
variant and length (and |dL/d embedding|), and its growth from the shortest length; ``--set`` changes the model
config (ablations, or the paper's memory: ``--set memory.ln_init=unit_rms memory.ln_eps=1e-5``). ``--dtypes``
adds the cosine between the float64 gradient and the one computed in float32 or under bf16 autocast (float32
weights, as in training).
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


def gradient(cfg: ModelConfig, n: int, dtype: str = "float64") -> torch.Tensor:
    """The whole gradient (flattened, float64) of a fresh model's loss on n random tokens; ``dtype`` float64,
    float32, or bf16 (autocast over float32 weights). The embedding's gradient comes first."""
    torch.manual_seed(0)
    model = build_model(cfg).to(torch.float32 if dtype == "bf16" else getattr(torch, dtype))
    tokens = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
        loss = model.loss(tokens)
    loss.backward()
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--window", type=int, default=128, help="SWA window and MAC segment")
    parser.add_argument("--set", nargs="*", default=[], help="model config overrides, key=value (memory.theta_max=0.01)")
    parser.add_argument("--dtypes", nargs="*", default=[], choices=["float32", "bf16"],
                        help="also the cosine between these gradients and float64's")
    args = parser.parse_args()
    configs = {v: model_config(v, args) for v in args.variants}
    print(f"# |gradient| (|dL/d embedding|) at initialisation, float64, dim {args.dim}, {args.layers} layers, window/segment "
          f"{args.window}, memory {configs[args.variants[0]].memory}")
    print(f"{'N':>6} " + " ".join(f"{v:>17}" for v in args.variants))
    grads = {}
    for n in args.lengths:
        grads[n] = {}
        for v in args.variants:
            g = gradient(configs[v], n)
            grads[n][v] = g.norm().item()
            grads[n][v, "embed"] = g[: configs[v].vocab_size * configs[v].dim].norm().item()
            for dtype in args.dtypes:
                grads[n][v, dtype] = torch.nn.functional.cosine_similarity(g, gradient(configs[v], n, dtype), dim=0).item()
        cells = [f"{grads[n][v]:.3g} ({grads[n][v, 'embed']:.3g})" for v in args.variants]
        print(f"{n:>6} " + " ".join(f"{c:>17}" for c in cells), flush=True)
        for dtype in args.dtypes:
            print(f"{'cos ' + dtype:>6} " + " ".join(f"{grads[n][v, dtype]:>17.5f}" for v in args.variants), flush=True)
    first, last = args.lengths[0], args.lengths[-1]
    print(f"growth |g({last})| / |g({first})|: " + ", ".join(f"{v} {grads[last][v] / grads[first][v]:.3g}" for v in args.variants))


if __name__ == "__main__":
    main()
