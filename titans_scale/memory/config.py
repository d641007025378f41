"""Typed configuration of the neural long-term memory (design doc, section 1)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MemoryConfig:
    """Hyper-parameters of one neural memory layer; ``dim`` and ``heads`` come from the model."""

    depth: int = 2  # L_M: 1 = linear matrix memory, >= 2 = MLP with residual + LayerNorm
    expansion: int = 4  # e: hidden width e * d of the memory MLP
    chunk_size: int = 16  # b: tokens whose inner gradients share the chunk-start weights
    theta_max: float = 0.1  # upper bound of the inner learning rate theta_t
    momentum: bool = True  # ablation switch: False sets eta_t = 0 (no past surprise)
    forgetting: bool = True  # ablation switch: False sets alpha_t = 0 (no weight decay)
    conv_width: int = 4  # causal depthwise convolution on q, k, v
    alpha_bias_init: float = -6.0  # forgetting starts near 0.0025 per token (see design doc)
    eta_bias_init: float = 0.0  # momentum starts mid-range (0.5)
    theta_bias_init: float = 0.0
    # The LayerNorm inside a deep memory (docs/memory.md). ln_init: the scale it starts at, "unit_norm" (1/sqrt(d):
    # its output has unit l2 norm per head, like the l2-normalised q and k it is added to, so that the inner loss
    # can fall below |LN| and the inner loop stays contractive) or "unit_rms" (1: the paper's / PyTorch's default,
    # an output of norm sqrt(d) that no target of that size can be fitted by). ln_eps: a floor on the variance of
    # the MLP's output before the norm, which bounds the norm's gain at 1/sqrt(ln_eps) when forgetting shrinks the
    # fast weights (1e-5, the usual value, lets that gain, and the outer gradient, grow without bound).
    ln_init: str = "unit_norm"
    ln_eps: float = 1e-2
    checkpoint_every: int = 0  # keep the memory state every k chunks, recompute between (0 = off)
    # how the chunk loop runs: eager (PyTorch), compiled (torch.compile of the chunk step; the first call
    # compiles for tens of seconds), cudagraph (compiled, and on a GPU each chunk step is one CUDA graph
    # replay), triton (the whole loop in one kernel each way; GPU), or auto (triton on a GPU where the
    # kernel covers the shape, else cudagraph there with a warning naming why; eager on CPU)
    backend: str = "eager"
    # the triton backend's float32 matrix products: ieee (exact fp32 on CUDA cores), tf32x3 (tensor cores,
    # three passes, about fp32's accuracy) or tf32 (tensor cores, 10-bit mantissa: not equal to eager)
    kernel_precision: str = "ieee"
    hand_backward: bool = True  # the chunk loop's hand-written backward; False: autograd through every step
