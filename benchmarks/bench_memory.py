"""Forward+backward tokens/s of one neural memory layer vs. sequence length, side by side with the slow
reference and (when installed: `pip install titans-pytorch==0.5.5`) the peer package, in one run.

    python benchmarks/bench_memory.py [--lengths 1024 2048 4096 8192 16384] [--rounds 3] [--peer-lengths 1024]

Columns: the default path (hand-written backward, every chunk state kept), with chunk-state recomputation,
and with autograd's backward through each chunk step instead (the path before the hand-written one).

Every timed sample covers the same number of tokens (the longest length: 16 passes at 1K, one at 16K; see
benchmarks/timing.py), so the time ratios compare sustained cost, not the luckiest short pass.

Config (issue 2): dim 256, 4 heads, depth 2, expansion 4, chunk 16, batch 1, fp32, CPU threads as set
by OMP_NUM_THREADS / torch defaults.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from titans_scale.memory import MemoryConfig, NeuralMemory
from timing import per_pass_seconds


DIM, HEADS = 256, 4


def fwd_bwd(module_call, x: torch.Tensor):
    """One forward + backward of ``module_call`` on ``x``, as a step for ``per_pass_seconds``."""

    def step() -> None:
        module_call(x.detach().requires_grad_()).float().square().mean().backward()

    return step


def layer(every: int = 0, hand_backward: bool = True) -> NeuralMemory:
    torch.manual_seed(0)
    cfg = MemoryConfig(depth=2, expansion=4, chunk_size=16, checkpoint_every=every, hand_backward=hand_backward)
    return NeuralMemory(DIM, HEADS, cfg)


AUTOGRAD = -1  # a config code: every chunk state kept, backward by autograd through each chunk step


def child(n: int, every: int, tokens: int) -> None:
    torch.manual_seed(1)
    memory = layer(max(every, 0), hand_backward=every != AUTOGRAD)
    print(json.dumps(per_pass_seconds(fwd_bwd(lambda xi: memory(xi)[0], torch.randn(1, n, DIM)), n, tokens)))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(*(int(a) for a in sys.argv[2:5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per timed sample (default: the longest length): ceil(tokens / N) passes each")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all lengths; the best of each is kept")
    parser.add_argument("--peer-lengths", type=int, nargs="*", default=[1024],
                        help="the peer needs ~10 GB at 1K and more than 23 GB at 2K (killed here)")
    parser.add_argument("--every", type=int, nargs="*", default=[16],
                        help="also time memory.checkpoint_every = k (chunk-state recomputation)")
    parser.add_argument("--no-autograd", action="store_true",
                        help="skip the column with autograd's backward in place of the hand-written one")
    parser.add_argument("--reference-length", type=int, default=256)
    args = parser.parse_args()
    tokens = args.tokens or max(args.lengths)

    dim, heads = DIM, HEADS
    ours = layer()
    print(f"# neural memory layer fwd+bwd, dim={dim} heads={heads} depth=2 expansion=4 chunk=16 batch=1, "
          f"threads={torch.get_num_threads()}")

    peer = None
    try:
        from titans_pytorch import NeuralMemory as PeerMemory

        peer = PeerMemory(dim=dim, heads=heads, chunk_size=16, batch_size=16)
    except ImportError:
        print("# titans-pytorch not installed: peer column skipped (pip install titans-pytorch==0.5.5)")

    # the layer as configured (every chunk state kept) and with chunk-state recomputation (bounded memory),
    # each point in a fresh process: in one long-lived process glibc's heap, shaped by the earlier (other)
    # lengths, made the same step up to 1.5x slower per token at 16K than in a process of its own
    configs = [0, *args.every] + ([] if args.no_autograd else [AUTOGRAD])
    wall = {(e, n): float("inf") for e in configs for n in args.lengths}
    cpu = dict(wall)
    for _ in range(args.rounds):  # rounds over all lengths: a slow spell of the machine hits every length
        for n in args.lengths:
            for e in configs:
                out = subprocess.run([sys.executable, __file__, "child", str(n), str(e), str(tokens)],
                                     capture_output=True, text=True, check=True)
                t, c = json.loads(out.stdout.strip().splitlines()[-1])
                wall[e, n], cpu[e, n] = min(wall[e, n], t), min(cpu[e, n], c)
    every_cols = "".join(f" {f'every={e} tok/s':>15}" for e in args.every)
    auto_cols = "" if args.no_autograd else f" {'autograd tok/s':>14} {'hand/autograd':>13}"
    print(f"{'N':>6} {'ours tok/s':>11} {'CPU ms/tok':>10}{every_cols}{auto_cols} {'peer tok/s':>11} {'ours/peer':>9}")
    for n in args.lengths:
        line = f"{n:>6} {n / wall[0, n]:>11.0f} {1e3 * cpu[0, n] / n:>10.3f}"
        line += "".join(f" {n / wall[e, n]:>15.0f}" for e in args.every)
        if not args.no_autograd:
            line += f" {n / wall[AUTOGRAD, n]:>14.0f} {wall[AUTOGRAD, n] / wall[0, n]:>12.2f}x"
        if peer is not None and n in args.peer_lengths:
            tp, _ = per_pass_seconds(fwd_bwd(lambda xi: peer(xi)[0], torch.randn(1, n, dim)), n, 0)
            line += f" {n / tp:>11.0f} {tp / wall[0, n]:>8.1f}x"
        print(line, flush=True)

    n0 = args.lengths[0]
    for n in args.lengths[1:]:
        extra = "".join(f", every={e} {wall[e, n] / wall[e, n0]:.2f} wall" for e in args.every)
        print(f"time ratio t({n})/t({n0}) = {wall[0, n] / wall[0, n0]:.2f} wall, {cpu[0, n] / cpu[0, n0]:.2f} CPU{extra}  "
              f"(linear: {n / n0:.1f}; goal <= {1.1 * n / n0:.1f})")

    n = args.reference_length
    x = torch.randn(1, n, dim)
    fast, _ = per_pass_seconds(fwd_bwd(lambda xi: ours(xi)[0], x), n, 4 * n)
    ours.reference = True
    slow, _ = per_pass_seconds(fwd_bwd(lambda xi: ours(xi)[0], x), n, 0)
    ours.reference = False
    print(f"reference (token loop, autograd inner gradient) at N={n}: {n / slow:.0f} tok/s; fast path {n / fast:.0f} tok/s; "
          f"speed-up {slow / fast:.1f}x")


if __name__ == "__main__":
    main()
