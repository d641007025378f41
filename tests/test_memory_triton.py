"""The Triton scan (``memory.backend=triton``: the whole chunk loop in one kernel each way) against the
eager path, on CPU through Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported:
a fresh process). Outputs, carried state and every gradient, for depth 1 and 2, chunk sizes 16 and 64,
ragged lengths, pieces with carried state, a head size that is not a power of two, momentum off, and
state kept every chunk or every 2 chunks.

Bounds: both paths compute the same formulas in another order, so in float64 they differ by rounding
(2^-53) amplified by the deep memory's sensitivity to its early writes (the fast-vs-reference test in
test_memory.py measures up to 1e-9 at a larger inner step): 1e-10 relative. In float32 the same
amplification puts the eager path itself ~1e-4 from the float64 result with these gates, so the kernel
in float32 must be as accurate as the eager path in float32 (within 4x of its error against float64)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import torch
    from titans_scale.memory import MemoryConfig, NeuralMemory

    def build(backend, dtype, **cfg):
        torch.manual_seed(0)
        mem = NeuralMemory(cfg.pop("dim"), cfg.pop("heads"), MemoryConfig(backend=backend, alpha_bias_init=-3.0, **cfg)).double()
        with torch.no_grad():  # gates that vary per token, a LayerNorm that is not the identity
            for proj in (mem.to_theta, mem.to_eta, mem.to_alpha):
                if proj is not None:
                    proj.weight.normal_(std=0.5)
            if mem.ln is not None:
                mem.ln_weight.normal_(1.0, 0.2)
                mem.ln_bias.normal_(0.0, 0.2)
            else:
                mem.initial_weights[0].normal_(std=0.3)
        return mem.to(dtype)

    def run(mem, x, pieces):
        x = x.clone().requires_grad_()
        outs, state, start = [], None, 0
        for n in pieces:
            y, state = mem(x[:, start:start + n], state)
            outs.append(y)
            start += n
        y = torch.cat(outs, 1)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        ((y * w).sum() + sum((t * t).sum() for t in (*state.memory.weights, *state.memory.momentum))).backward()
        grads = {n: p.grad for n, p in mem.named_parameters()}
        grads["input"] = x.grad
        return y.detach(), [t.detach() for t in state.memory.tensors()], grads

    def err(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0

    CASES = [  # (config, sequence pieces, dtype)
        (dict(dim=32, heads=2, depth=1, chunk_size=16), [37], torch.float64),
        (dict(dim=32, heads=2, depth=2, expansion=2, chunk_size=16), [53], torch.float64),
        (dict(dim=48, heads=2, depth=2, expansion=2, chunk_size=16, checkpoint_every=2), [5, 20, 16, 1, 33], torch.float64),
        (dict(dim=32, heads=2, depth=2, expansion=4, chunk_size=16, momentum=False), [40], torch.float64),
        (dict(dim=32, heads=2, depth=1, chunk_size=16, forgetting=False), [7, 41], torch.float64),
        (dict(dim=32, heads=1, depth=2, expansion=1, chunk_size=64), [150], torch.float64),
        (dict(dim=32, heads=2, depth=2, expansion=2, chunk_size=16), [48], torch.float32),
    ]
    def worst(out, ref):  # the largest relative error of outputs, state and every gradient, and where
        (y1, s1, g1), (y0, s0, g0) = out, ref
        errors = {"outputs": err(y1.double(), y0), "state": max(err(a.double(), b) for a, b in zip(s1, s0))}
        errors.update({f"grad {n}": err(g1[n].double(), g0[n]) for n in g0})
        assert all(g0[n].abs().max() > 0 for n in g0), [n for n in g0 if not g0[n].abs().max() > 0]
        name = max(errors, key=errors.get)
        return errors[name], name

    for cfg, pieces, dtype in CASES:
        x = torch.randn(2, sum(pieces), cfg["dim"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        truth = run(build("eager", torch.float64, **dict(cfg)), x, [sum(pieces)])
        kernel = run(build("triton", dtype, **dict(cfg)), x.to(dtype), pieces)
        error, where = worst(kernel, truth)
        if dtype == torch.float64:
            assert error < 1e-10, (cfg, pieces, where, error)
        else:  # as accurate as the eager path in float32 (a slip in the kernel shows as O(1))
            eager_error, eager_where = worst(run(build("eager", dtype, **dict(cfg)), x.to(dtype), [sum(pieces)]), truth)
            assert error < 4 * eager_error, (cfg, pieces, where, error, eager_where, eager_error)
            print(f"  eager in {dtype}: worst {eager_where}: {eager_error:.1e}")
        print(cfg, pieces, dtype, f"worst {where}: {error:.1e}")
    print("triton == eager")
    """
)


def test_triton_scan_equals_eager_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "triton == eager" in proc.stdout


def test_triton_backend_refuses_what_it_cannot_run():
    from titans_scale.memory import MemoryConfig, NeuralMemory
    from titans_scale.memory.layer import resolve_backend

    with pytest.raises(ValueError, match="chunk_size a power of two >= 16, got 4"):
        NeuralMemory(64, 2, MemoryConfig(chunk_size=4, backend="triton"))
    with pytest.raises(ValueError, match="depth 1 and 2, got 3"):
        NeuralMemory(64, 2, MemoryConfig(depth=3, backend="triton"))
    with pytest.raises(ValueError, match="backend='fast' must be one of eager, compiled, cudagraph, triton, auto"):
        NeuralMemory(64, 2, MemoryConfig(backend="fast"))
    with pytest.raises(ValueError, match="kernel_precision='tf16' must be one of ieee, tf32x3, tf32"):
        NeuralMemory(64, 2, MemoryConfig(backend="triton", kernel_precision="tf16"))
    # auto: the kernel on a GPU where it covers the shape, else the CUDA-graph step (with the reason); eager on CPU
    assert resolve_backend(MemoryConfig(backend="auto"), 64, "cuda") == ("triton", None)
    backend, reason = resolve_backend(MemoryConfig(backend="auto", chunk_size=8), 64, "cuda")
    assert backend == "cudagraph" and "chunk_size" in reason
    assert resolve_backend(MemoryConfig(backend="auto"), 64, "cpu") == ("eager", None)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="needs a CUDA device"):
            resolve_backend(MemoryConfig(backend="triton"), 64, "cpu")


def test_gpu_benchmark_script_runs_end_to_end_on_cpu():
    """benchmarks/bench_gpu.py is the prepared GPU check; its smoke mode (tiny shapes, the interpreter) keeps
    every section of it runnable between the sessions that have a GPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_gpu.py"), "--device", "cpu", "--smoke"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FAILED" not in proc.stdout, proc.stdout
    for needle in ("triton outputs", "the eager path's tokens/s", "mal:", "# done"):
        assert needle in proc.stdout, (needle, proc.stdout)
