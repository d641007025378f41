"""The fused Triton kernel of the memory layer update against the eager path, run on CPU through
Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported: a fresh process)."""

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

    torch.manual_seed(0)
    for momentum in (True, False):
        x = torch.randn(2, 37, 64, dtype=torch.float64)
        results = []
        for fused in (False, True):
            torch.manual_seed(1)
            cfg = MemoryConfig(depth=2, expansion=2, chunk_size=16, momentum=momentum, fused_kernel=fused, alpha_bias_init=-3.0)
            mem = NeuralMemory(64, 2, cfg).double()
            xi = x.clone().requires_grad_()
            y, state = mem(xi)
            (y.square().sum() + sum(w.square().sum() for w in state.memory.weights)).backward()
            grads = [p.grad for p in mem.parameters()] + [xi.grad]
            results.append((y, state.memory.tensors(), grads))
        (y0, s0, g0), (y1, s1, g1) = results
        def err(a, b):
            return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()
        assert err(y1, y0) < 1e-12, ("outputs", err(y1, y0))
        assert max(err(a, b) for a, b in zip(s1, s0) if b.numel()) < 1e-12
        assert max(err(a, b) for a, b in zip(g1, g0)) < 1e-11, max(err(a, b) for a, b in zip(g1, g0))
    print("fused == eager")
    """
)


def test_fused_kernel_equals_eager_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fused == eager" in proc.stdout


def test_fused_kernel_rejects_unsupported_shapes():
    from titans_scale.memory import MemoryConfig, NeuralMemory

    with pytest.raises(ValueError, match="chunk_size a power of two >= 16, got 4"):
        NeuralMemory(64, 2, MemoryConfig(chunk_size=4, fused_kernel=True))
