"""Forward+backward tokens/s of one neural memory layer vs. sequence length, side by side with the slow
reference and (when installed: `pip install titans-pytorch==0.5.5`, the `bench` extra) the peer package, in one run.

    python benchmarks/bench_memory.py [--lengths 1024 2048 4096 8192 16384] [--rounds 3] [--peer-lengths 1024 2048 4096]

Columns: the default path (hand-written backward, every chunk state kept), with chunk-state recomputation,
and with autograd's backward through each chunk step instead (the path before the hand-written one); then
the peer, ``titans_pytorch.NeuralMemory`` built to match (dim 256, 4 heads of dim_head=64, the same depth-2
x4 memory MLP with residual + LayerNorm, chunk_size=16: the same fast weights per head, checked and printed)
in each of its two settings: ``batch_size=16`` (weights updated every 16 tokens: the gradient sharing of our
chunk b = 16) and its default ``batch_size=None`` (every inner gradient taken at W_0, a cheaper model).
What still differs is printed under the table.

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


PEERS = {-2: 16, -3: None}  # config codes of the peer: its batch_size (16: updates every chunk; None: all at W_0)
PEER_NAMES = {-2: "peer b=16", -3: "peer W0"}
DIFFERENCES = """what still differs (ours vs the peer): ours reads every token after its own write (dual form inside the
chunk), the peer reads each chunk at the weights of the chunk boundary; ours has per-token momentum and
forgetting gates, the peer per-chunk ones (mean-pooled over the chunk; its learning rate is per token);
ours runs a causal depthwise convolution (width 4) on q, k, v and l2-normalises q and k, the peer has
neither (an RMSNorm on its input instead); ours gates the read by the input and RMS-normalises it, the peer
gates heads by a sigmoid; the LayerNorm scale of the memory MLP is an outer parameter in ours, a fast weight
in the peer. batch_size=None (the peer's default) takes every inner gradient at W_0: a different, cheaper
model than ours, timed as the peer ships it."""


def peer(batch_size: int | None):
    from titans_pytorch import NeuralMemory as PeerMemory

    return PeerMemory(dim=DIM, heads=HEADS, dim_head=DIM // HEADS, chunk_size=16, batch_size=batch_size,
                      default_model_kwargs=dict(depth=2, expansion_factor=4.0))


def fast_weights(module) -> int:
    """Entries of the fast-weight matrices (heads, out, in) of one layer, ours or the peer's."""
    params = module.initial_weights if isinstance(module, NeuralMemory) else module.memory_model_parameters
    return sum(p.numel() for p in params if p.dim() == 3)


def child(n: int, every: int, tokens: int) -> None:
    torch.manual_seed(1)
    memory = peer(PEERS[every]) if every in PEERS else layer(max(every, 0), hand_backward=every != AUTOGRAD)
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
    parser.add_argument("--peer-lengths", type=int, nargs="*", default=[1024, 2048, 4096],
                        help="lengths at which the peer runs too (it holds per-token gradients: memory grows fast)")
    parser.add_argument("--every", type=int, nargs="*", default=[16],
                        help="also time memory.checkpoint_every = k (chunk-state recomputation)")
    parser.add_argument("--no-autograd", action="store_true",
                        help="skip the column with autograd's backward in place of the hand-written one")
    parser.add_argument("--reference-length", type=int, default=256)
    parser.add_argument("--measure", choices=("wall", "cpu"), default="wall",
                        help="what tok/s and the ratios are computed from: wall time, or the process's CPU time "
                             "(leaves out the time other tenants held the cores; use it with OMP_NUM_THREADS=1 "
                             "on a shared machine, where spinning OpenMP threads also inflate CPU time)")
    args = parser.parse_args()
    tokens = args.tokens or max(args.lengths)

    dim, heads = DIM, HEADS
    ours = layer()
    print(f"# neural memory layer fwd+bwd, dim={dim} heads={heads} depth=2 expansion=4 chunk=16 batch=1, "
          f"threads={torch.get_num_threads()}, tok/s from {args.measure} time")

    peers = []
    try:
        mine, theirs = fast_weights(ours), fast_weights(peer(16))
        print(f"# peer: titans_pytorch.NeuralMemory(dim={dim}, heads={heads}, dim_head={dim // heads}, chunk_size=16, "
              f"batch_size=16 | None); fast-weight matrices per layer: ours {mine:,}, peer {theirs:,}")
        peers = list(PEERS)
    except ImportError:
        print("# titans-pytorch not installed: peer columns skipped (pip install titans-pytorch==0.5.5)")

    # the layer as configured (every chunk state kept) and with chunk-state recomputation (bounded memory),
    # each point in a fresh process: in one long-lived process glibc's heap, shaped by the earlier (other)
    # lengths, made the same step up to 1.5x slower per token at 16K than in a process of its own
    configs = [0, *args.every] + ([] if args.no_autograd else [AUTOGRAD])
    points = [(e, n) for n in args.lengths for e in configs] + [(e, n) for n in args.peer_lengths for e in peers]
    wall = {point: float("inf") for point in points}
    cpu = dict(wall)
    for _ in range(args.rounds):  # rounds over all lengths: a slow spell of the machine hits every length
        for e, n in points:
            out = subprocess.run([sys.executable, __file__, "child", str(n), str(e), str(tokens)],
                                 capture_output=True, text=True, check=e not in PEERS)
            if out.returncode:  # the peer ran out of memory (killed) or failed: that point stays empty
                print(f"# {PEER_NAMES[e]} at N={n} failed (exit {out.returncode}): {out.stderr.strip()[-200:]}")
                continue
            t, c = json.loads(out.stdout.strip().splitlines()[-1])
            wall[e, n], cpu[e, n] = min(wall[e, n], t), min(cpu[e, n], c)
    if args.measure == "cpu":  # every tok/s and ratio below from CPU time
        wall = cpu
    every_cols = "".join(f" {f'every={e} tok/s':>15}" for e in args.every)
    auto_cols = "" if args.no_autograd else f" {'autograd tok/s':>14} {'hand/autograd':>13}"
    peer_cols = "".join(f" {PEER_NAMES[e] + ' tok/s':>16} {'ours/' + PEER_NAMES[e].split()[1]:>9}" for e in peers)
    print(f"{'N':>6} {'ours tok/s':>11} {'CPU ms/tok':>10}{every_cols}{auto_cols}{peer_cols}")
    for n in args.lengths:
        line = f"{n:>6} {n / wall[0, n]:>11.0f} {1e3 * cpu[0, n] / n:>10.3f}"
        line += "".join(f" {n / wall[e, n]:>15.0f}" for e in args.every)
        if not args.no_autograd:
            line += f" {n / wall[AUTOGRAD, n]:>14.0f} {wall[AUTOGRAD, n] / wall[0, n]:>12.2f}x"
        for e in peers:
            t = wall.get((e, n), float("inf"))
            line += f" {n / t:>16.0f} {t / wall[0, n]:>8.1f}x" if t < float("inf") else f" {'-':>16} {'-':>9}"
        print(line, flush=True)
    if peers:
        print(DIFFERENCES)

    n0 = args.lengths[0]
    for n in args.lengths[1:]:
        extra = "".join(f", every={e} {wall[e, n] / wall[e, n0]:.2f} {args.measure}" for e in args.every)
        both = f"{wall[0, n] / wall[0, n0]:.2f} wall, " if args.measure == "wall" else ""
        print(f"time ratio t({n})/t({n0}) = {both}{cpu[0, n] / cpu[0, n0]:.2f} CPU{extra}  "
              f"(linear: {n / n0:.1f}; goal <= {1.1 * n / n0:.1f})")

    n = args.reference_length
    x = torch.randn(1, n, dim)
    pick = 1 if args.measure == "cpu" else 0
    fast = per_pass_seconds(fwd_bwd(lambda xi: ours(xi)[0], x), n, 4 * n)[pick]
    ours.reference = True
    slow = per_pass_seconds(fwd_bwd(lambda xi: ours(xi)[0], x), n, 0)[pick]
    ours.reference = False
    print(f"reference (token loop, autograd inner gradient) at N={n}: {n / slow:.0f} tok/s; fast path {n / fast:.0f} tok/s; "
          f"speed-up {slow / fast:.1f}x")


if __name__ == "__main__":
    main()
