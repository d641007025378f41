"""Perplexity on prepared validation shards or on any text / JSON-lines / parquet file.

Every predicted token is scored once, with everything before it in its sequence as context: a sequence is
read in windows that carry the model's state, so a context longer than the training length is evaluated
exactly as one pass would (the memory keeps learning across windows). Sequences are:

- shards (a directory with ``titans_data.json``): the validation split is one contiguous token stream
  (documents + eos, as prepared); it is cut into sequences of ``--context`` tokens (default: the shards'
  sequence length, i.e. what training validates on), and the first token of each is not predicted;
- files: each document is one sequence, ``[eos] + tokens`` (every token predicted after the document
  boundary the model saw in training), or with ``--context N`` the documents' stream (tokens + eos) cut
  into sequences of N tokens as for shards.

Reported: mean loss (nats per predicted token), perplexity = exp(loss), tokens evaluated, and the loss by
position in the sequence (log-spaced buckets), which shows how far back the model uses its context.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from titans_scale.data.progress import Progress, human

from .errors import EvalError
from .inference import auto_batch_size, batch_size_arg, token_logprobs

META_NAME = "titans_data.json"


@dataclass
class PerplexityResult:
    """Totals of one evaluation; ``by_position[i]`` covers positions [2^i, 2^(i+1)) of a sequence (1-based)."""

    nll: float = 0.0
    tokens: int = 0
    sequences: int = 0
    bucket_nll: list[float] = field(default_factory=list)
    bucket_tokens: list[int] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def add(self, logprobs: torch.Tensor, lengths: list[int]) -> None:
        """Add rows of per-position log-probabilities, row i valid for its first lengths[i] positions."""
        for row, n in zip(logprobs.double(), lengths):
            nll = -row[:n]
            self.nll += nll.sum().item()
            self.tokens += n
            self.sequences += 1
            for b in range(n.bit_length()):  # positions p = 1..n, bucket b holds 2^b <= p < 2^(b+1)
                if b == len(self.bucket_nll):
                    self.bucket_nll.append(0.0)
                    self.bucket_tokens.append(0)
                part = nll[(1 << b) - 1 : min(n, (1 << (b + 1)) - 1)]
                self.bucket_nll[b] += part.sum().item()
                self.bucket_tokens[b] += part.numel()

    def by_position(self) -> list[dict]:
        return [{"from": 1 << b, "to": (1 << (b + 1)) - 1, "tokens": t, "loss": s / t}
                for b, (s, t) in enumerate(zip(self.bucket_nll, self.bucket_tokens)) if t]


@torch.no_grad()
def evaluate_sequences(model, sequences: Iterable[list[int]], *, batch_size: int | None = None, window: int | None = None,
                       pad_id: int = 0, max_tokens: int | None = None, progress: Progress | None = None,
                       device: torch.device | str = "cpu") -> PerplexityResult:
    """Mean next-token loss over ``sequences`` (lists of ids, >= 2 each), batched with right padding (causal
    models: padding after a token cannot change its prediction), each read in windows with carried state;
    ``batch_size`` None: as many sequences as keep a model call at TOKENS_PER_CALL tokens."""
    result = PerplexityResult()
    started = time.perf_counter()
    for batch in _batches(sequences, batch_size, max_tokens, window):
        width = max(map(len, batch))
        tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for i, seq in enumerate(batch):
            tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        logprobs, _ = token_logprobs(model, tokens.to(device), window)
        result.add(logprobs.cpu(), [len(seq) - 1 for seq in batch])
        if progress is not None:
            rate = result.tokens / max(time.perf_counter() - started, 1e-9)
            total = f"/{human(max_tokens)}" if max_tokens else ""
            eta = f" | ETA {(max_tokens - result.tokens) / rate:.0f}s" if max_tokens else ""
            progress.update(f"{human(result.tokens)}{total} tokens | loss {result.loss:.4f} | "
                            f"ppl {result.perplexity:.2f} | {human(rate)} tok/s{eta}")
    return result


def _batches(sequences: Iterable[list[int]], batch_size: int | None, max_tokens: int | None,
             window: int | None = None) -> Iterator[list[list[int]]]:
    """Groups of up to batch_size sequences (None: as many as keep a model call at TOKENS_PER_CALL tokens),
    the last cut so that at most max_tokens tokens are predicted."""
    batch, budget = [], max_tokens
    for seq in sequences:
        if budget is not None:
            if budget <= 0:
                break
            seq = seq[: budget + 1]
            budget -= len(seq) - 1
        if len(seq) < 2:
            continue
        if batch and batch_size is None and len(batch) + 1 > auto_batch_size(max(len(seq), *map(len, batch)) - 1, window):
            yield batch
            batch = []
        batch.append(seq)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def cut(stream: Iterable[list[int]], context: int) -> Iterator[list[int]]:
    """Consecutive sequences of ``context`` tokens from a stream of token lists (the tail too, if >= 2)."""
    buffer: list[int] = []
    for piece in stream:
        buffer.extend(piece)
        while len(buffer) >= context:
            yield buffer[:context]
            del buffer[:context]
    if len(buffer) >= 2:
        yield buffer


# ----------------------------------------------------------------------------------------------------
# Sources


def is_shards(path: str) -> bool:
    return (Path(path) / META_NAME).is_file()


def shard_stream(data_dir: str, tokenizer) -> tuple[Iterator[list[int]], int]:
    """The validation split of prepared shards, in order, as a token stream; and the shards' seq_len."""
    from titans_scale.data import DataConfig, build_val_loader, read_metadata

    meta = read_metadata(data_dir)
    cfg = DataConfig(data_dir=str(data_dir), tokenizer=str(tokenizer.path), seq_len=meta["seq_len"], num_workers=0,
                     verify_shards="size")
    loader = build_val_loader(cfg, micro_batch=1, dp_rank=0, dp_size=1)
    return (batch[0].tolist() for batch in loader), meta["seq_len"]


def document_tokens(corpus: str, tokenizer) -> Iterator[list[int]]:
    """The documents of parquet / jsonl / txt files (a file, directory or glob), tokenized."""
    from titans_scale.data.corpus import check_corpus, iter_documents, resolve_corpus

    paths = resolve_corpus(corpus)
    check_corpus(paths)
    for doc in iter_documents(paths):
        yield tokenizer.encode(doc.text)


def sequences_of(data: str, tokenizer, context: int) -> tuple[Iterator[list[int]], dict]:
    """The sequences to score and a description of them (source kind, context)."""
    eos = tokenizer.eos_id
    if is_shards(data):
        stream, seq_len = shard_stream(data, tokenizer)
        context = context or seq_len
        return cut(stream, context), {"source": "shards (val split)", "context": context}
    docs = document_tokens(data, tokenizer)
    if context:
        return cut((doc + [eos] for doc in docs), context), {"source": "files", "context": context}
    return ([eos] + doc for doc in docs), {"source": "files", "context": "document"}


# ----------------------------------------------------------------------------------------------------
# Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="prepared shards (a directory with titans_data.json: its val split), or text files: "
                             ".txt/.jsonl/.parquet file, directory or glob")
    parser.add_argument("--context", type=int, default=0,
                        help="tokens per sequence (default: the shards' seq_len; for files, one sequence per document)")
    parser.add_argument("--max-tokens", type=int, default=None, help="stop after this many predicted tokens")
    parser.add_argument("--batch-size", type=batch_size_arg, default=None, metavar="N|auto",
                        help="sequences per forward pass (default auto: as many as keep a call at 8192 tokens)")


def run(args: argparse.Namespace) -> dict:
    from .checkpoint import model_path
    from .cli import open_model, results_dir
    from .results import log_to_wandb, write_json

    model_path(args.checkpoint)  # the first thing to be wrong is the first reported
    if args.context and args.context < 2:
        raise EvalError(f"--context {args.context} must be >= 2 (a token and the one it predicts), or 0 for the default")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise EvalError("--max-tokens must be >= 1")
    if not is_shards(args.data) and not Path(args.data).exists() and not any(c in args.data for c in "*?["):
        raise EvalError(f"--data {args.data} does not exist; give prepared shards or a .txt/.jsonl/.parquet file, directory or glob")
    loaded = open_model(args)
    out = results_dir(args, loaded)
    sequences, described = sequences_of(args.data, loaded.tokenizer, args.context)
    progress = Progress("perplexity")
    started = time.perf_counter()
    result = evaluate_sequences(loaded.model, sequences, batch_size=args.batch_size, window=loaded.window,
                                pad_id=loaded.tokenizer.eos_id, max_tokens=args.max_tokens, progress=progress,
                                device=loaded.device)
    seconds = time.perf_counter() - started
    if not result.tokens:
        raise EvalError(f"--data {args.data} yielded no sequence of 2 or more tokens to score")
    summary = {"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
               "sequences": result.sequences}
    progress.done(f"loss {result.loss:.4f} | perplexity {result.perplexity:.3f} | {human(result.tokens)} tokens in "
                  f"{result.sequences} sequences | {human(result.tokens / max(seconds, 1e-9))} tok/s")
    record = {"task": "perplexity", "checkpoint": str(loaded.path), "data": args.data, **described,
              "window": loaded.window, **summary, "seconds": round(seconds, 3), "by_position": result.by_position()}
    json_path = write_json(out / "perplexity.json", record)
    png = loss_by_position_plot(out / "perplexity.png", result, f"{loaded.path.parent.name}: {args.data}")
    print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.3f}  tokens {result.tokens}  "
          f"sequences {result.sequences}")
    print(f"wrote {json_path} and {png}")
    log_to_wandb(args.wandb, out, "perplexity", summary, config=record | {"by_position": None},
                 images={"loss_by_position": png}, model_file=loaded.path, project=args.wandb_project)
    return record


def loss_by_position_plot(path: Path, result: PerplexityResult, title: str) -> Path:
    """Mean loss of the tokens at each (log-spaced) position range: falling = the model uses far context."""
    from .results import new_figure, save_figure

    rows = result.by_position()
    fig, ax = new_figure(6, 3.5)
    ax.plot([r["from"] for r in rows], [r["loss"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in sequence (tokens, bucket start)")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
