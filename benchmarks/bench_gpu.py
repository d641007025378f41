"""The GPU path in one prepared run that always reports: the Triton scan against the eager path on CUDA,
the memory layer alone with each backend at the 760M shape, then training throughput of every variant at
the paper's sizes, side by side with the Transformer++ (issue: Titans layers at GPU speed).

    python benchmarks/bench_gpu.py [--budget 480] [--sections exactness layer models]
                                   [--sizes 760M 170M] [--lengths 4096 16384 32768]
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --device cpu --smoke   # this script's own check

Sections and points run in order of importance; one that would start after ``--budget`` seconds is
skipped and says so, and a failure prints one line and the run goes on. Model rows: fwd+bwd+AdamW step
under bf16 autocast (fp32 master weights, fp32 memory state), the paper configuration of each size
(``paper_config``: equal parameters across variants, window 2048, segment 512, chunk 16,
``memory.checkpoint_every=8`` as in the paper recipes, ``memory.backend=auto``), micro-batch 1 and the
largest power-of-two micro-batch that fits (up to 64K tokens per micro-batch). MFU counts the model's
FLOPs per token (``model_stats``, fwd+bwd = 3x forward) against ``--peak`` (H200/H100 dense bf16: 989e12).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from titans_scale.memory import MemoryConfig, NeuralMemory
from titans_scale.models import build_model, model_stats, paper_config

START = time.time()
SECTIONS = ["exactness", "layer", "models"]
VARIANTS = ("transformer", "swa", "lmm", "mac", "mag", "mal")


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def over_budget(args, what: str) -> bool:
    if time.time() - START > args.budget:
        print(f"# budget reached ({args.budget:.0f} s): {what} skipped", flush=True)
        return True
    return False


def guarded(what: str, fn):
    """Run ``fn``; a failure (out of memory included) is one line, and the run goes on."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - report and go on
        line = (str(e).splitlines() or [""])[0][:200]
        print(f"# {what}: FAILED {type(e).__name__}: {line}", flush=True)
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# exactness: the kernel against the eager path, on this device


def layer_run(cfg: MemoryConfig, x: torch.Tensor, dim: int, heads: int, pieces=None):
    torch.manual_seed(1)
    mem = NeuralMemory(dim, heads, cfg).double()
    with torch.no_grad():  # gates that vary per token (the defaults make them nearly constant)
        for proj in (mem.to_theta, mem.to_eta, mem.to_alpha):
            proj.weight.normal_(std=0.5)
    mem = mem.to(x.device, x.dtype)
    xi = x.clone().requires_grad_()
    outs, state, start = [], None, 0
    for n in pieces or [x.shape[1]]:
        y, state = mem(xi[:, start:start + n], state)
        outs.append(y)
        start += n
    y = torch.cat(outs, 1)
    (y.square().mean() + sum(w.square().mean() for w in state.memory.weights)).backward()
    return y.detach(), [w.detach() for w in state.memory.tensors()], [p.grad for p in mem.parameters()] + [xi.grad]


def exactness(dev, args) -> None:
    print("## exactness: memory.backend=triton vs eager on this device (max |diff| / max |reference|)")
    print("# float64: both against eager float64; float32: kernel and eager float32 both against eager float64")
    cases = [("depth 2, d 64, b 16", dict(depth=2, chunk_size=16), 64, 4, None),
             ("depth 2, d 96, b 16, pieces", dict(depth=2, chunk_size=16), 96, 4, [333, 16, 651]),
             ("depth 1, d 64, b 16", dict(depth=1, chunk_size=16), 64, 4, None),
             ("depth 2, d 64, b 64", dict(depth=2, chunk_size=64), 64, 4, None)]
    if args.smoke:
        cases = [("depth 2, d 16, b 16, pieces", dict(depth=2, expansion=2, chunk_size=16), 16, 2, [21, 16, 11])]
    n = sum(cases[0][4] or [args.exact_length]) if args.smoke else args.exact_length
    for name, mem_cfg, d, heads, pieces in cases:
        if over_budget(args, f"exactness {name}"):
            return
        length = sum(pieces) if pieces else n
        x = torch.randn(2, length, d * heads, device=dev, dtype=torch.float64)

        ref = guarded(f"exactness {name} eager float64", lambda: layer_run(MemoryConfig(**mem_cfg), x, d * heads, heads))
        if ref is None:
            continue
        for dtype, precision in ((torch.float64, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32x3")):

            def one():  # each dtype on its own: a kernel that does not build for float64 still reports float32
                kernel = layer_run(MemoryConfig(**mem_cfg, backend="triton", kernel_precision=precision), x.to(dtype),
                                   d * heads, heads, pieces)
                line = (f"{name:>28} {str(dtype):>14} {precision:>6}: triton outputs {rel(kernel[0], ref[0]):.1e} state "
                        f"{max(rel(a, b) for a, b in zip(kernel[1], ref[1]) if b.numel()):.1e} gradients "
                        f"{max(rel(a, b) for a, b in zip(kernel[2], ref[2])):.1e}")
                if dtype == torch.float32 and precision == "ieee":
                    eager = layer_run(MemoryConfig(**mem_cfg), x.to(dtype), d * heads, heads)
                    line += (f" | eager fp32 outputs {rel(eager[0], ref[0]):.1e} gradients "
                             f"{max(rel(a, b) for a, b in zip(eager[2], ref[2])):.1e}")
                print(line, flush=True)

            guarded(f"exactness {name} {dtype} {precision}", one)
        if not args.smoke and name == cases[0][0]:  # the fallback path once: the CUDA-graph chunk step
            def graphs():
                out = layer_run(MemoryConfig(**mem_cfg, backend="cudagraph"), x.to(torch.float32), d * heads, heads)
                print(f"{name:>28} {'torch.float32':>14} {'':>6}: cudagraph outputs {rel(out[0], ref[0]):.1e} gradients "
                      f"{max(rel(a, b) for a, b in zip(out[2], ref[2])):.1e}", flush=True)

            guarded(f"exactness {name} cudagraph", graphs)


# ----------------------------------------------------------------------------------------------------
# the memory layer alone


def timed(dev, fn, repeats: int) -> float:
    fn()  # warm-up: compilation, autotuning, allocator
    sync(dev)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - start)
    return best


def layer_speed(dev, args) -> None:
    dim, heads, batch, n = (1536, 16, 4, 4096) if not args.smoke else (32, 2, 2, 64)
    print(f"## memory layer alone, fwd+bwd, the 760M shape: dim {dim}, {heads} heads (d {dim // heads}), depth 2, "
          f"e 4, b 16, N {n}, micro-batch {batch}, bf16 autocast (fp32 state), checkpoint_every 8")
    x = torch.randn(batch, n, dim, device=dev)
    seconds = {}
    paths = {"triton": ("triton", "ieee"), "triton-tf32x3": ("triton", "tf32x3"), "cudagraph": ("cudagraph", "ieee"),
             "compiled": ("compiled", "ieee"), "eager": ("eager", "ieee")}
    if args.smoke:
        paths.pop("compiled")
        paths.pop("cudagraph")
    for name, (backend, precision) in paths.items():
        if over_budget(args, f"layer {name}"):
            break
        cfg = MemoryConfig(depth=2, expansion=4, chunk_size=16, checkpoint_every=8, backend=backend, kernel_precision=precision)
        torch.manual_seed(0)
        mem = NeuralMemory(dim, heads, cfg).to(dev)

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                y, _ = mem(x)
            y.float().square().mean().backward()

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = guarded(f"layer {name}", lambda: timed(dev, step, 1 if backend == "eager" else 3))
        if t is None:
            continue
        seconds[name] = t
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        print(f"{name:>14}: {batch * n / t:>10.0f} tokens/s  peak {peak:6.1f} GiB", flush=True)
    if "eager" in seconds:
        for name, t in seconds.items():
            print(f"{name:>14}: {seconds['eager'] / t:.1f}x the eager path's tokens/s")


# ----------------------------------------------------------------------------------------------------
# training throughput of the models


def train_step_time(dev, cfg, batch: int, n: int, repeats: int) -> tuple[float, float]:
    """Seconds of one fwd+bwd+AdamW step and the peak GiB, bf16 autocast with fp32 master weights."""
    torch.manual_seed(0)
    with torch.device(dev):
        model = build_model(cfg)
        tokens = torch.randint(0, cfg.vocab_size, (batch, n + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model.loss(tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        t = timed(dev, step, repeats)
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        return t, peak
    finally:
        del model, opt, tokens


def model_speed(dev, args) -> None:
    print("## training throughput per GPU (fwd+bwd+AdamW, bf16 autocast): tokens/s | peak GiB | MFU; "
          "x = tokens/s / the Transformer++'s at the same size, length and micro-batch")
    for size in args.sizes:
        for n in args.lengths:
            for batch_rule in ("1", "max"):
                if over_budget(args, f"{size} N={n} micro-batch {batch_rule}"):
                    return
                print(f"# {size}, N {n}, micro-batch {batch_rule}", flush=True)
                rates = {}
                for variant in VARIANTS:
                    if over_budget(args, f"{size} {variant} N={n}"):
                        return
                    cfg = paper_config(size, variant)
                    cfg = replace(cfg, memory=replace(cfg.memory, checkpoint_every=8, backend="auto"))
                    if args.smoke:
                        cfg = replace(cfg, dim=32, n_heads=2, n_layers=1, mlp_hidden=64, vocab_size=256, window=16,
                                      segment_len=16, persistent_tokens=4, memory=replace(cfg.memory, expansion=2))
                    _, flops = model_stats(cfg, n)
                    batches = [1] if batch_rule == "1" else [b for b in (2, 4, 8, 16, 32) if b * n <= args.max_tokens]
                    best = None
                    for batch in batches:
                        got = guarded(f"{size} {variant} N={n} mb={batch}",
                                      lambda: train_step_time(dev, cfg, batch, n, 1 if args.smoke else 2))
                        if got is None:
                            break  # out of memory (or another failure): the previous micro-batch is the largest
                        rate = batch * n / got[0]
                        if best is None or rate > best[0]:
                            best = (rate, got[1], batch)
                    if best is None:
                        continue
                    rate, peak, batch = best
                    rates[variant] = rate
                    mfu = rate * 3 * flops / args.peak
                    ratio = f"{rate / rates['transformer']:.2f}x" if "transformer" in rates else "-"
                    print(f"{size:>5} N {n:>6} mb {batch:>2} {variant:>11}: {rate:>9.0f} tok/s | {peak:6.1f} GiB | "
                          f"MFU {100 * mfu:5.1f}% | {ratio}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480.0, help="seconds after which points are skipped")
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--sizes", nargs="+", default=["760M", "170M"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--max-tokens", type=int, default=65536, help="largest micro-batch x length tried")
    parser.add_argument("--exact-length", type=int, default=1000, help="tokens of the exactness check (a ragged end)")
    parser.add_argument("--peak", type=float, default=989e12, help="peak dense bf16 FLOP/s of one GPU (H100/H200)")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (TRITON_INTERPRET=1)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (or --device cpu --smoke with TRITON_INTERPRET=1)")
    if args.smoke:
        args.lengths, args.sizes, args.max_tokens = [32], ["170M"], 64
    dev = torch.device(args.device)
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}", flush=True)
    for section, fn in (("exactness", exactness), ("layer", layer_speed), ("models", model_speed)):
        if section in args.sections:
            fn(dev, args)
    print(f"# done in {time.time() - START:.0f} s")


if __name__ == "__main__":
    main()
