"""Model-level speed and memory, measured side by side in one run (issue: scale and speed).

    python benchmarks/bench_models.py speed  [--lengths 1024 2048 4096 8192 16384] [--compile]
    python benchmarks/bench_models.py memory [--lengths 2048 4096 8192 16384] [--every 16]

``speed``: forward+backward tokens/s of every variant (lmm, mac, mag, mal) and baseline (transformer,
swa) at equal parameter count (each baseline's SwiGLU width is chosen to match), batch 1, with the ratio
of each variant's time at the longest length to its time at 2K, and mag/mal vs. the transformer. Every timed
sample covers the same number of tokens (benchmarks/timing.py).
``memory``: growth of the peak resident set during one training step (fresh process per point) of an LMM model, with and
without chunk-state recomputation (``memory.checkpoint_every``), and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys

import torch

from titans_scale.memory import MemoryConfig
from titans_scale.models import ModelConfig, build_model, parameter_count
from timing import per_pass_seconds

VARIANTS = ("transformer", "swa", "lmm", "mac", "mag", "mal")

# glibc keeps freed heap memory and reuses it only for fitting sizes, so a process's peak RSS measures the
# allocator's history more than the live tensors (recomputation then even looked worse). With every block
# over 64 KiB mapped on its own and returned on free, the peak RSS follows the live memory.
LIVE_RSS_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def small_config(variant: str, **overrides) -> ModelConfig:
    base = dict(
        variant=variant, vocab_size=1024, dim=128, n_layers=2, n_heads=4, persistent_tokens=16,
        segment_len=512, window=512, memory=MemoryConfig(depth=2, expansion=4, chunk_size=16),
    )
    base.update(overrides)
    return ModelConfig(**base)


def matched_config(variant: str, target: int) -> ModelConfig:
    """The variant with its SwiGLU width chosen so that its parameter count is closest to ``target``."""
    best = min(range(16, 4096, 16), key=lambda h: abs(parameter_count(small_config(variant, mlp_hidden=h)) - target))
    return small_config(variant, mlp_hidden=best)


def fwd_bwd_seconds(model, n: int, tokens: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward+backward at length N, averaged over ``tokens`` tokens (timing.py)."""
    batch = torch.randint(0, model.cfg.vocab_size, (1, n))
    return per_pass_seconds(lambda: model.loss(batch).backward(), n, tokens)


TITANS = ("lmm", "mac", "mag", "mal")


def speed(args) -> None:
    torch.manual_seed(0)
    target = parameter_count(small_config("mag"))
    models = {v: build_model(matched_config(v, target)) for v in VARIANTS}
    if args.compile:  # the same models with memory.backend=compiled: the chunk step and its backward compiled
        for v in TITANS:
            cfg = matched_config(v, target)
            models[f"{v}+c"] = build_model(dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, backend="compiled")))
    names = list(models)
    print(f"# fwd+bwd tokens/s, batch 1, dim 128, 2 layers, 4 heads, window 512, segment 512, chunk 16, "
          f"threads={torch.get_num_threads()}")
    print("# parameters: " + ", ".join(f"{v} {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M" for v, m in models.items()))
    wall = {(v, n): float("inf") for v in names for n in args.lengths}
    cpu = dict(wall)
    for r in range(args.rounds):  # interleaved rounds, best of each point: a slow spell hits every length
        for n in args.lengths:
            for v, m in models.items():
                t, c = fwd_bwd_seconds(m, n, args.tokens or max(args.lengths))
                wall[v, n], cpu[v, n] = min(wall[v, n], t), min(cpu[v, n], c)
            print(f"# round {r + 1}/{args.rounds}: {n} done", flush=True)
    print(f"{'N':>6} " + " ".join(f"{v:>11}" for v in names))
    for n in args.lengths:
        print(f"{n:>6} " + " ".join(f"{n / wall[v, n]:>11.0f}" for v in names))
    longest, ref = args.lengths[-1], 2048 if 2048 in args.lengths else args.lengths[0]
    for v in names:
        print(f"{v:>11}: t({longest})/t({ref}) = {wall[v, longest] / wall[v, ref]:.2f} wall, "
              f"{cpu[v, longest] / cpu[v, ref]:.2f} CPU (linear {longest / ref:.1f}; goal for Titans <= {1.1 * longest / ref:.1f})")
    for v in [name for name in names if name != "transformer"]:
        print(f"{v:>11} vs transformer at {longest}: {wall['transformer', longest] / wall[v, longest]:.2f}x the tokens/s")


def peak_rss_child(n: int, every: int, blocks: bool) -> None:
    torch.manual_seed(0)
    # head size 64 (dim 256, 4 heads), as in the memory benchmark and the paper's models: the chunk states
    # then weigh what they weigh at scale
    cfg = small_config("lmm", dim=256, memory=MemoryConfig(depth=2, expansion=4, chunk_size=16, checkpoint_every=every),
                       activation_checkpointing=blocks)
    model = build_model(cfg)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.loss(torch.randint(0, cfg.vocab_size, (1, n))).backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": after / 1024, "step_mb": (after - before) / 1024}))


def memory(args) -> None:
    print("# peak RSS growth of one LMM training step over the built model (dim 256, 2 layers, 4 heads, chunk 16),")
    print("# fresh process per point;")
    print(f"# memory.checkpoint_every={args.every} (chunk states), then with model.activation_checkpointing too (blocks)")
    print(f"{'N':>6} {'no recompute MB':>16} {f'every {args.every} MB':>14} {'ratio':>6} {'+ blocks MB':>12} {'ratio':>6}")
    for n in args.lengths:
        row = []
        for every, blocks in ((0, 0), (args.every, 0), (args.every, 1)):
            out = subprocess.run([sys.executable, __file__, "child", str(n), str(every), str(blocks)],
                                 capture_output=True, text=True, check=True, env=LIVE_RSS_ENV)
            row.append(json.loads(out.stdout.strip().splitlines()[-1])["step_mb"])
        print(f"{n:>6} {row[0]:>16.0f} {row[1]:>14.0f} {row[1] / row[0]:>6.2f} {row[2]:>12.0f} {row[2] / row[0]:>6.2f}",
              flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        peak_rss_child(int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["speed", "memory"])
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per timed sample (default: the longest length): ceil(tokens / N) passes each")
    parser.add_argument("--compile", action="store_true",
                        help="also time the Titans variants with memory.backend=compiled (columns lmm+c, ...; "
                             "the first pass compiles and is not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all lengths; the best of each is kept")
    parser.add_argument("--every", type=int, default=16, help="chunks between kept states (memory benchmark)")
    args = parser.parse_args()
    if args.what == "speed":
        args.lengths = args.lengths or [1024, 2048, 4096, 8192, 16384]
        speed(args)
    else:
        args.lengths = args.lengths or [2048, 4096, 8192, 16384]
        memory(args)


if __name__ == "__main__":
    main()
