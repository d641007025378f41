"""Sampling from a model with its state: prefill the prompt once, then one token at a time.

The memories keep learning from every token they read and write, exactly as on a whole-sequence pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row of logits (B, V) -> (B, 1). temperature 0: argmax; top_k / top_p filter first."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_tokens: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue ``prompt_tokens`` ((B, N) or (N,)) by ``max_new_tokens``; returns prompt + continuation in
    the prompt's shape. ``model(tokens, state) -> (logits, state)`` as ``TitansLM``."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None for no cut)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None for no cut)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    squeeze = prompt_tokens.dim() == 1
    tokens = prompt_tokens.unsqueeze(0) if squeeze else prompt_tokens
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prompt_tokens have shape {tuple(prompt_tokens.shape)}; expected a non-empty (N,) or (B, N)")
    pieces = [tokens]
    if max_new_tokens:
        logits, state = model(tokens)
        for step in range(max_new_tokens):
            token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            pieces.append(token)
            if step + 1 < max_new_tokens:
                logits, state = model(token, state)
    out = torch.cat(pieces, 1)
    return out[0] if squeeze else out
