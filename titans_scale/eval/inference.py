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
# What ``--batch-size auto`` fills per model call: batch x tokens of the call (the longest row, at most the
# window). The logits then take 8192 x V floats (1 GiB at a 32K vocabulary in float32), and a sequence's
# memory state ~0.25 GiB at the 760M shape: about 1-2 GiB on top of the weights.
TOKENS_PER_CALL = 8192


def auto_batch_size(length: int, window: int | None) -> int:
    """Rows per call for ``--batch-size auto``: as many as keep a call at TOKENS_PER_CALL tokens."""
    width = min(length, window) if window else length
    return max(1, TOKENS_PER_CALL // max(width, 1))


def batch_size_arg(text: str) -> int | None:
    """``--batch-size`` on the command line: a count >= 1, or ``auto`` (None)."""
    import argparse

    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a count >= 1 or auto")
    return value


def batches_by_length(items: list, length, batch_size: int | None, window: int | None) -> Iterator[list[int]]:
    """Indices of ``items`` in batches of similar length (shortest first): ``batch_size`` rows each, or with
    ``batch_size`` None (auto) as many as keep a call at TOKENS_PER_CALL tokens."""
    order = sorted(range(len(items)), key=lambda i: length(items[i]))
    batch: list[int] = []
    for i in order:
        rows = batch_size or auto_batch_size(length(items[i]), window)  # the longest so far: sorted
        if batch and len(batch) >= rows:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


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


@torch.no_grad()
def greedy_continuations(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, *, stop=None,
                         window: int | None = DEFAULT_WINDOW, device: torch.device | str = "cpu") -> list[list[int]]:
    """The greedy continuation of every prompt (token lists of any lengths), batched without padding: the
    tokens all prompts share in count are read at once (in windows), then every row takes one token per
    call, the next of its prompt while it lasts, else its own greedy choice; each row reads exactly its
    own tokens, as alone. A row ends after ``max_new_tokens`` or once ``stop(tokens)`` is true."""
    if not prompts or min(map(len, prompts)) == 0:
        raise EvalError("every prompt needs at least one token")
    shared = min(map(len, prompts))
    logits, state = read(model, torch.tensor([p[:shared] for p in prompts], dtype=torch.long, device=device), window)
    out: list[list[int]] = [[] for _ in prompts]
    done = [max_new_tokens == 0] * len(prompts)
    position = shared
    while not all(done):
        choice = logits.argmax(-1).tolist()
        step = []
        for i, prompt in enumerate(prompts):
            if position < len(prompt):
                step.append(prompt[position])
                continue
            if not done[i]:
                out[i].append(choice[i])
                done[i] = len(out[i]) >= max_new_tokens or bool(stop and stop(out[i]))
            step.append(out[i][-1])  # a finished row keeps reading its last token (its result is fixed)
        position += 1
        if all(done):
            break
        logits, state = model(torch.tensor(step, dtype=torch.long, device=device)[:, None], state)
        logits = logits[:, -1]
    return out


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
