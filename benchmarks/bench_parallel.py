"""Sequence parallelism at world size 2 on CPU (gloo): how long each rank waits for its neighbour, and how
many bytes each rank sends per training step, measured next to the formula of docs/parallel.md.

    python benchmarks/bench_parallel.py [--steps 5] [--layers 8] [--dim 128] [--seq 512]

Waiting: the relay scheme with the layer wavefront (rank r works on layer l while rank r+1 works on
layer l-1), with it deepened by 2 micro-batches, and without it (every hand-off after the whole forward or
backward pass); the all-to-all scheme's time inside its collectives and halo exchanges. Bytes: every
variant, both schemes, counted where they are sent (``titans_scale.parallel.comm``), per step after the
first (which also sends each state's description once).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.distributed as dist

from titans_scale.config import ParallelConfig
from titans_scale.memory import MemoryConfig
from titans_scale.models import VARIANTS, ModelConfig, build_model

TIMING_RUNS = (
    ("relay, layer wavefront", "relay", {}),
    ("relay, wavefront + 2 micro-batches", "relay", {"micro_batches": 2}),
    ("relay, hand-off after the whole pass", "relay", {"wavefront": False}),
    ("all_to_all", "all_to_all", {}),
)


def timing_config(args) -> ModelConfig:
    return ModelConfig(variant=args.variant, vocab_size=512, dim=args.dim, n_layers=args.layers, n_heads=4, mlp_hidden=2 * args.dim,
                       persistent_tokens=4, segment_len=64, window=64, memory=MemoryConfig(chunk_size=16))


def bytes_config(variant: str) -> ModelConfig:
    return ModelConfig(variant=variant, vocab_size=64, dim=32, n_layers=2, n_heads=4, mlp_hidden=64, persistent_tokens=2,
                       segment_len=8, window=8, memory=MemoryConfig(chunk_size=4))


# ----------------------------------------------------------------------------------------------------
# The formula (docs/parallel.md, "Bytes per step")


def formula_bytes(cfg: ModelConfig, scheme: str, batch: int, seq: int, sp: int, rank: int, itemsize: int) -> int:
    """Bytes one SP rank sends in one training step (forward + backward), tensor parallelism 1."""
    B, S, H, d = batch, seq // sp, cfg.n_heads, cfg.head_dim
    m = cfg.memory
    weights = sum(o * i for o, i in _shapes(d, m.depth, m.expansion))
    memory = 2 * B * H * weights + B * (m.conv_width - 1) * 3 * H * d  # (W, S) per head, the convolution cache
    nxt, prv = rank < sp - 1, rank > 0

    def window_kv(r: int) -> int:
        return 2 * B * H * min(cfg.window - 1, (r + 1) * S) * d

    def relay_state(kind: str, r: int) -> int:  # what rank r hands to rank r+1 for one layer
        return {
            "lmm": memory,
            "mal": memory + window_kv(r),
            "mag": memory + window_kv(r),
            "mac": memory + B * (m.conv_width - 1) * H * d,  # + the retrieval queries' convolution cache
            "window": window_kv(r),
            "full": 2 * B * H * (r + 1) * S * d,
        }[kind]

    total = 0
    for kind in cfg.layer_kinds():
        if scheme == "relay" or kind == "mac":
            total += nxt * relay_state(kind, rank) + prv * relay_state(kind, rank - 1)  # states forward, gradients back
            continue
        if kind in ("lmm", "mal", "mag"):  # conv halo both ways, two all-to-alls both ways
            total += (nxt + prv) * B * (m.conv_width - 1) * 3 * H * d
            total += 2 * B * H * S * (4 * d + 3) * (sp - 1) // sp
        if kind in ("mal", "mag", "window"):  # the window's keys/values, both ways
            total += (nxt + prv) * 2 * B * H * (cfg.window - 1) * d
        if kind == "full":  # all-gather of keys/values, reduce-scatter of their gradients
            total += 2 * (sp - 1) * 2 * B * H * S * d
    return total * itemsize


def _shapes(d: int, depth: int, expansion: int) -> list[tuple[int, int]]:
    from titans_scale.memory import memory_shapes

    return memory_shapes(d, depth, expansion)


# ----------------------------------------------------------------------------------------------------
# The job on each rank


def _step(model, tokens) -> float:
    dist.barrier()
    start = time.perf_counter()
    model.loss(tokens).backward()
    from titans_scale.parallel.comm import STATS

    STATS.flush()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench_job(rank: int, world: int, args) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from titans_scale.parallel import init_parallel, parallelize
    from titans_scale.parallel.comm import STATS

    groups = init_parallel(tp=1, sp=world)
    out = {"timing": {}, "bytes": {}}
    tokens = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for name, scheme, options in TIMING_RUNS:
        torch.manual_seed(0)
        model = parallelize(build_model(timing_config(args)), ParallelConfig(sp=world, sp_scheme=scheme), groups, **options)
        _step(model, tokens)  # warm-up
        runs = []
        for _ in range(args.steps):
            STATS.reset()
            step = _step(model, tokens)
            runs.append((step, sum(STATS.wait.values())))
        out["timing"][name] = sorted(runs)[len(runs) // 2]  # the median step (the machine is shared)

    small = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    for variant in VARIANTS:
        for scheme in ("relay", "all_to_all"):
            torch.manual_seed(0)
            cfg = bytes_config(variant)
            model = parallelize(build_model(cfg), ParallelConfig(sp=world, sp_scheme=scheme), groups)
            _step(model, small)  # the first step also sends each state's description
            STATS.reset()
            _step(model, small)
            sent = sum(v for k, v in STATS.sent.items() if k != "relay_meta")
            out["bytes"][(variant, scheme)] = (sent, formula_bytes(cfg, scheme, 2, 64, world, rank, 4))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--variant", default="mag")
    args = parser.parse_args()

    from titans_scale.parallel.spawn import spawn

    world = 2
    print(f"# sequence parallel, world {world} (sp={world}, gloo, CPU, 1 thread per rank): {args.variant}, {args.layers} layers, "
          f"dim {args.dim}, 4 heads, chunk 16, window 64, batch {args.batch} x {args.seq} tokens, float32, "
          f"median of {args.steps} steps after a warm-up")
    results = spawn(bench_job, world, args)
    print(f"{'schedule':<38} " + " | ".join(f"rank {r}: step s, waiting s (share)" for r in range(world)))
    for name, *_ in TIMING_RUNS:
        cells = []
        for r in range(world):
            step, wait = results[r]["timing"][name]
            cells.append(f"rank {r}: {step:6.3f} s, {wait:6.3f} s ({100 * wait / step:4.1f}%)")
        print(f"{name:<38} " + " | ".join(cells))
    print("# bytes sent per training step (forward + backward) by each rank, measured vs formula (docs/parallel.md); "
          "tiny model: dim 32, 2 layers, 4 heads, chunk 4, window 8, segment 8, batch 2 x 64 tokens, float32")
    for variant in VARIANTS:
        for scheme in ("relay", "all_to_all"):
            cells = []
            for r in range(world):
                measured, formula = results[r]["bytes"][(variant, scheme)]
                mark = "" if measured == formula else "  MISMATCH"
                cells.append(f"rank {r}: {measured:>8,d} measured {formula:>8,d} formula{mark}")
            print(f"{variant:<12} {scheme:<11} " + " | ".join(cells))


if __name__ == "__main__":
    main()
