"""Stateful inference shared by every evaluation and by generation.

A Titans model reads a sequence in windows, carrying its state (the memories keep learning from every token
they read): ``model(tokens, state) -> (logits, state)``, and pieces equal one pass over the whole sequence.
So any length is read in windows of ``window`` tokens, which bounds activation memory without changing the
result (beyond float rounding). RoPE positions have no upper limit, so no context length is refused here.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from titans_scale.models import sample_next, token_cross_entropy

from .errors import EvalError

DEFAULT_WINDOW = 2048


def window_slices(n: int, window: int | None) -> list[slice]:
    """Consecutive slices of ``range(n)`` of at most ``window`` (None or 0: one slice)."""
    if not window or window >= n:
        return [slice(0, n)]
    return [slice(s, min(s + window, n)) for s in range(0, n, window)]


@torch.no_grad()
def read(model: nn.Module, tokens: Tensor, window: int | None = DEFAULT_WINDOW, state=None) -> tuple[Tensor, object]:
    """Feed ``tokens`` (B, N) in windows; returns the logits after the last token (B, V) and the state."""
    logits = None
    for piece in window_slices(tokens.shape[1], window):
        logits, state = model(tokens[:, piece], state)
    return logits[:, -1], state


@torch.no_grad()
def token_logprobs(model: nn.Module, tokens: Tensor, window: int | None = DEFAULT_WINDOW) -> tuple[Tensor, Tensor]:
    """For every position t of (B, N) tokens: log p(tokens[t+1] | tokens[:t+1]) and whether tokens[t+1] is the
    argmax, both (B, N - 1), from one stateful pass in windows (float32 or the model's wider dtype)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logprobs, greedy, state = [], [], None
    for piece in window_slices(inputs.shape[1], window):
        logits, state = model(inputs[:, piece], state)
        logprobs.append(-token_cross_entropy(logits, targets[:, piece]))
        greedy.append(logits.argmax(-1) == targets[:, piece])
    return torch.cat(logprobs, 1), torch.cat(greedy, 1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    """Sampling options, checked where the user gives them."""
    if not temperature >= 0:
        raise EvalError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise EvalError(f"top_k={top_k} must be >= 1 (or unset for no cut)")
    if top_p is not None and not 0 < top_p <= 1:
        raise EvalError(f"top_p={top_p} must be in (0, 1] (or unset for no cut)")
    if max_new_tokens < 0:
        raise EvalError(f"max_new_tokens={max_new_tokens} must be >= 0")


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    window: int | None = DEFAULT_WINDOW,
) -> Iterator[Tensor]:
    """Yield the next token of every row of ``prompt`` (B, N), (B,) at a time: the prompt is read once in
    windows, then each sampled token is fed back with the state. Stop early by leaving the loop."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise EvalError(f"the prompt has shape {tuple(prompt.shape)}; it needs at least one token")
    if max_new_tokens == 0:
        return
    logits, state = read(model, prompt, window)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        yield token[:, 0]
        if step + 1 < max_new_tokens:
            logits, state = model(token, state)
            logits = logits[:, -1]


class IncrementalDecoder:
    """Text of tokens as they arrive, for streaming. Each step decodes a short tail that starts a few tokens
    back (sentencepiece drops a word's leading space at the start of a decode, so the difference of two
    decodes of the same start is exact), and holds text back while its bytes do not form whole characters."""

    CONTEXT = 4  # tokens of the prompt decoded before the first new one

    def __init__(self, tokenizer, context: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids = [int(t) for t in list(context)[-self.CONTEXT:]]
        self.prefix, self.read = 0, len(self.ids)

    def push(self, token: int) -> str:
        """The new text that ``token`` completes ('' while a multi-byte character is incomplete)."""
        self.ids.append(int(token))
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Text held back at the end (bytes that never formed a whole character decode as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""
