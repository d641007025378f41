"""Forward+backward tokens/s of one neural memory layer vs. sequence length, side by side with the slow
reference and (when installed: `pip install titans-pytorch==0.5.5`) the peer package, in one run.

    python benchmarks/bench_memory.py [--lengths 1024 2048 4096 8192 16384] [--repeats 2]

Config (issue 2): dim 256, 4 heads, depth 2, expansion 4, chunk 16, batch 1, fp32, CPU threads as set
by OMP_NUM_THREADS / torch defaults.
"""

from __future__ import annotations

import argparse
import time

import torch

from titans_scale.memory import MemoryConfig, NeuralMemory


def time_fwd_bwd(module_call, x: torch.Tensor, repeats: int) -> float:
    """Best-of-``repeats`` wall time of forward + backward (after one warm-up)."""
    best = float("inf")
    for i in range(repeats + 1):
        xi = x.detach().requires_grad_()
        start = time.perf_counter()
        out = module_call(xi)
        out.float().square().mean().backward()
        elapsed = time.perf_counter() - start
        if i > 0 or repeats == 0:
            best = min(best, elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peer-lengths", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--reference-length", type=int, default=256)
    args = parser.parse_args()

    torch.manual_seed(0)
    dim, heads = 256, 4
    cfg = MemoryConfig(depth=2, expansion=4, chunk_size=16)
    ours = NeuralMemory(dim, heads, cfg)
    print(f"# neural memory layer fwd+bwd, dim={dim} heads={heads} depth=2 expansion=4 chunk=16 batch=1, "
          f"threads={torch.get_num_threads()}")

    peer = None
    try:
        from titans_pytorch import NeuralMemory as PeerMemory

        peer = PeerMemory(dim=dim, heads=heads, chunk_size=16, batch_size=16)
    except ImportError:
        print("# titans-pytorch not installed: peer column skipped (pip install titans-pytorch==0.5.5)")

    ours_tps = {}
    print(f"{'N':>6} {'ours tok/s':>11} {'peer tok/s':>11} {'ours/peer':>9}")
    for n in args.lengths:
        x = torch.randn(1, n, dim)
        t = time_fwd_bwd(lambda xi: ours(xi)[0], x, args.repeats)
        ours_tps[n] = n / t
        line = f"{n:>6} {n / t:>11.0f}"
        if peer is not None and n in args.peer_lengths:
            tp = time_fwd_bwd(lambda xi: peer(xi)[0], x, max(1, args.repeats - 1))
            line += f" {n / tp:>11.0f} {tp / t:>8.1f}x"
        print(line)

    n0 = args.lengths[0]
    for n in args.lengths[1:]:
        ratio = (n / ours_tps[n]) / (n0 / ours_tps[n0])
        print(f"time ratio t({n})/t({n0}) = {ratio:.2f}  (linear: {n / n0:.1f}; goal <= {1.1 * n / n0:.1f})")

    n = args.reference_length
    x = torch.randn(1, n, dim)
    fast = time_fwd_bwd(lambda xi: ours(xi)[0], x, args.repeats)
    ours.reference = True
    slow = time_fwd_bwd(lambda xi: ours(xi)[0], x, 0)
    ours.reference = False
    print(f"reference (token loop, autograd inner gradient) at N={n}: {n / slow:.0f} tok/s; fast path {n / fast:.0f} tok/s; "
          f"speed-up {slow / fast:.1f}x")


if __name__ == "__main__":
    main()
