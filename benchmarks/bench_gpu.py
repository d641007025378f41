"""The GPU path in one short run: exactness of autograd's backward (vs. the hand-written one), the fused
Triton kernel, torch.compile and bf16 autocast on CUDA against the eager path, then speed and peak memory
side by side (issue: scale and speed).

    python benchmarks/bench_gpu.py [--budget 420] [--lengths 2048 4096 8192 16384] [--sections model ...]

Needs only torch (and triton) on the GPU machine: the memory and the model zoo import nothing else.
Sections that would run past ``--budget`` seconds are skipped (and say so), so the run always reports.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from titans_scale.memory import MemoryConfig, NeuralMemory
from titans_scale.models import ModelConfig, build_model, parameter_count

START = time.time()
SECTIONS = ["exactness", "memory", "layer", "model"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def layer_run(cfg: MemoryConfig, x: torch.Tensor, dim=256, heads=4, seed=1):
    torch.manual_seed(seed)
    mem = NeuralMemory(dim, heads, cfg).to(x.device, x.dtype)
    xi = x.clone().requires_grad_()
    y, state = mem(xi)
    y.float().square().mean().backward()
    return y.detach(), [w.detach() for w in state.memory.weights], [p.grad for p in mem.parameters()] + [xi.grad]


def exactness(dev, n: int) -> None:
    print("## exactness on CUDA (max |diff| / max |eager|)")
    base = MemoryConfig(depth=2, expansion=4, chunk_size=16)
    for dtype in (torch.float64, torch.float32):
        x = torch.randn(2, n, 256, device=dev, dtype=dtype)  # n = 1000: a partial last chunk
        y0, w0, g0 = layer_run(base, x)
        for name, cfg in (("autograd", replace(base, hand_backward=False)), ("fused", replace(base, fused_kernel=True)),
                          ("compiled", replace(base, compile=True))):
            if name == "compiled" and dtype == torch.float64:
                continue
            try:
                y1, w1, g1 = layer_run(cfg, x)
                print(f"{str(dtype):>14} {name:>9} vs eager: outputs {rel(y1, y0):.1e}  state "
                      f"{max(rel(a, b) for a, b in zip(w1, w0)):.1e}  gradients {max(rel(a, b) for a, b in zip(g1, g0)):.1e}")
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{str(dtype):>14} {name:>9}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    # bf16 autocast: a small MAG model, loss and gradients vs float32; the memory state stays float32
    torch.manual_seed(0)
    cfg = ModelConfig(variant="mag", vocab_size=4096, dim=256, n_layers=2, n_heads=4, window=256, persistent_tokens=16,
                      memory=MemoryConfig(chunk_size=16))
    model = build_model(cfg).to(dev)
    tokens = torch.randint(0, 4096, (2, n), device=dev)
    loss32 = model.loss(tokens)
    g32 = torch.autograd.grad(loss32, list(model.parameters()))
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        loss16 = model.loss(tokens)
        _, state = model(tokens[:, :64])
    g16 = torch.autograd.grad(loss16, list(model.parameters()))
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in g16]).double(),
                                                torch.cat([g.flatten() for g in g32]).double(), dim=0).item()
    mem_state = state.layers[0][0].memory.memory.weights[0].dtype
    print(f"bf16 autocast vs fp32 (mag): loss {loss16.item():.5f} vs {loss32.item():.5f} (rel {abs(loss16.item() / loss32.item() - 1):.1e}), "
          f"gradient cosine {cos:.5f}, memory state dtype {mem_state}")


def within_budget(lengths, budget: float):
    """The lengths to run, until the script has used ``budget`` seconds."""
    for n in lengths:
        if time.time() - START > budget:
            print(f"# budget reached: lengths from {n} skipped")
            return
        yield n


def timed(fn, repeats: int = 2) -> float:
    fn()  # warm-up (compilation, autotuning)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def layer_speed(dev, lengths, budget) -> None:
    print("## memory layer fwd+bwd tokens/s (dim 256, 4 heads, depth 2, e 4, b 16, batch 1, fp32)")
    paths = {"eager": MemoryConfig(depth=2, expansion=4, chunk_size=16)}
    paths["autograd"] = replace(paths["eager"], hand_backward=False)
    paths["fused"] = replace(paths["eager"], fused_kernel=True)
    paths["compiled"] = replace(paths["eager"], compile=True)
    print(f"{'N':>6} " + " ".join(f"{p:>10}" for p in paths))
    seconds = {p: {} for p in paths}
    for n in within_budget(lengths, budget):
        x = torch.randn(1, n, 256, device=dev)
        for p, cfg in paths.items():
            torch.manual_seed(0)
            mem = NeuralMemory(256, 4, cfg).to(dev)

            def step():
                y, _ = mem(x)
                y.square().mean().backward()

            seconds[p][n] = timed(step)
        print(f"{n:>6} " + " ".join(f"{n / seconds[p][n]:>10.0f}" for p in paths), flush=True)
    for p in paths:
        done = sorted(seconds[p])
        if len(done) > 1:
            print(f"{p:>9}: t({done[-1]})/t({done[0]}) = {seconds[p][done[-1]] / seconds[p][done[0]]:.2f} "
                  f"(linear {done[-1] / done[0]:.1f})")


def model_config(variant: str, **overrides) -> ModelConfig:
    base = dict(variant=variant, vocab_size=32000, dim=768, n_layers=4, n_heads=12, persistent_tokens=64,
                segment_len=512, window=512, memory=MemoryConfig(depth=2, expansion=4, chunk_size=16, compile=True))
    base.update(overrides)
    return ModelConfig(**base)


def model_speed(dev, lengths, budget) -> None:
    variants = ("transformer", "swa", "lmm", "mac", "mag", "mal")
    target = parameter_count(model_config("mag"))

    def matched(v):
        h = min(range(256, 8192, 64), key=lambda h: abs(parameter_count(model_config(v, mlp_hidden=h)) - target))
        return model_config(v, mlp_hidden=h)

    print(f"## model fwd+bwd tokens/s, bf16 autocast, batch 1, dim 768, 4 layers, 12 heads, window/segment 512, "
          f"compiled memory step and backward, ~{target / 1e6:.0f}M parameters each")
    print(f"{'N':>6} " + " ".join(f"{v:>11}" for v in variants))
    seconds = {v: {} for v in variants}
    for n in within_budget(lengths, budget):
        tokens = torch.randint(0, 32000, (1, n + 1), device=dev)
        for v in variants:
            torch.manual_seed(0)
            model = build_model(matched(v)).to(dev)

            def step():
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    loss = model.loss(tokens)
                loss.backward()

            seconds[v][n] = timed(step, repeats=1)
            del model
        print(f"{n:>6} " + " ".join(f"{n / seconds[v][n]:>11.0f}" for v in variants), flush=True)
    done = sorted(seconds["mag"])
    if len(done) > 1:
        lo, hi = done[0], done[-1]
        for v in variants:
            print(f"{v:>11}: t({hi})/t({lo}) = {seconds[v][hi] / seconds[v][lo]:.2f} (linear {hi / lo:.1f}); "
                  f"vs transformer at {hi}: {seconds['transformer'][hi] / seconds[v][hi]:.2f}x the tokens/s")


def peak_memory(dev, n, budget) -> None:
    if time.time() - START > budget:
        print("# budget reached: peak memory skipped")
        return
    print(f"## peak GPU memory of one LMM training step at N={n} (bf16 autocast, eager memory path)")
    rows = (("no recomputation", {}), ("memory.checkpoint_every=16", {"checkpoint_every": 16}),
            ("+ activation_checkpointing", {"checkpoint_every": 16, "act": True}))
    tokens = torch.randint(0, 32000, (1, n + 1), device=dev)
    peaks = []
    for name, opts in rows:
        cfg = model_config("lmm", memory=MemoryConfig(depth=2, expansion=4, chunk_size=16,
                                                      checkpoint_every=opts.get("checkpoint_every", 0)),
                           activation_checkpointing=opts.get("act", False))
        torch.manual_seed(0)
        model = build_model(cfg).to(dev)
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model.loss(tokens)
        loss.backward()
        sync()
        peaks.append(((torch.cuda.max_memory_allocated() if dev.type == "cuda" else 1) - base) / 2**20)
        print(f"{name:>28}: {peaks[-1]:8.0f} MiB above the weights ({peaks[-1] / peaks[0]:.2f} of no recomputation)", flush=True)
        del model, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which sections are skipped")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--exact-length", type=int, default=1000)
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (or --device cpu for a smoke test)")
    dev = torch.device(args.device)
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}")
    if "exactness" in args.sections:
        exactness(dev, args.exact_length)
    if "memory" in args.sections:
        peak_memory(dev, args.lengths[-1], args.budget)
    if "layer" in args.sections:
        layer_speed(dev, [1024] + args.lengths, args.budget * 0.5)
    if "model" in args.sections:
        model_speed(dev, args.lengths, args.budget)
    print(f"# done in {time.time() - START:.0f} s")


if __name__ == "__main__":
    main()
