"""Prepare: corpus -> sentencepiece tokens -> fixed-length sequences -> MDS shards, train and val.

Command: python -m titans_scale.data.prepare --corpus GLOB --tokenizer PATH --seq-len N --out DIR

Each document becomes its tokens plus eos; documents are concatenated in corpus order and cut into
sequences of exactly seq_len tokens (the tail shorter than seq_len is dropped). A document goes to
validation when a seeded hash of its text falls below val_fraction, so the split is the same for any
number of workers and exact duplicates never straddle it. A document longer than MAX_DOCUMENT_CHARS is cut
at whitespace into documents of at most that length. The output is built in a temporary directory
(.OUT.tmp-HOST-PID, beside OUT) and renamed into place at the end: a directory with titans_data.json is
complete. A prepare killed before that leaves only its temporary directory, which the next prepare of the
same output removes.

Only light modules are imported at the top (no torch, no streaming), for workers started by spawn.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from titans_scale import version_text

from .corpus import Document, check_corpus, iter_documents, resolve_corpus
from .errors import DataError, run_cli
from .progress import Progress, human
from .files import write_atomic
from .tokenizer import Tokenizer, token_dtype

META_NAME = "titans_data.json"
FORMAT = "titans_scale.tokens/1"
COLUMN = "tokens"
SPLITS = ("train", "val")
CLI_OPTIONS = {"seq_len": "--seq-len", "val_fraction": "--val-fraction", "no_val": "--val-fraction 0"}
BATCH_CHARS = 1 << 18  # characters of text per tokenizer task
MAX_DOCUMENT_CHARS = 1 << 20  # a longer document is cut (at whitespace) into documents of at most this many
WHITESPACE = re.compile(r"\s")


def in_val_split(text: str, val_fraction: float, seed: int) -> bool:
    """Whether a document belongs to validation: a seeded 64-bit hash of its text, below the fraction."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


@dataclass
class Encoded:
    """One tokenizer task's result: the train and val token streams (eos after each document)."""

    train: np.ndarray
    train_docs: int
    val: np.ndarray
    val_docs: int
    chars: int


_tokenizer: Tokenizer | None = None  # set in each tokenizer process by _init_worker


def _init_worker(tokenizer: Tokenizer) -> None:
    global _tokenizer
    _tokenizer = tokenizer


def encode_documents(texts: list[str], val_fraction: float, seed: int) -> Encoded:
    """Tokenize a batch of documents and route each to its split (runs in a tokenizer process)."""
    tok = _tokenizer
    try:
        ids = tok.encode_batch(texts)
    except UnicodeEncodeError:  # lone surrogates (e.g. from JSON escapes) cannot be UTF-8: replace them
        texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
        ids = tok.encode_batch(texts)
    dtype = token_dtype(tok.vocab_size)
    streams: dict[bool, list[int]] = {False: [], True: []}
    docs = {False: 0, True: 0}
    for text, doc in zip(texts, ids):
        is_val = in_val_split(text, val_fraction, seed)
        streams[is_val].extend(doc)
        streams[is_val].append(tok.eos_id)
        docs[is_val] += 1
    return Encoded(
        np.array(streams[False], dtype), docs[False], np.array(streams[True], dtype), docs[True], sum(map(len, texts))
    )


class SplitWriter:
    """Packs one split's token stream into seq_len sequences and writes them as MDS samples."""

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype, shard_size: int, limit: int | None = None):
        from ._streaming import import_streaming

        self.path, self.seq_len, self.dtype, self.limit = path, seq_len, dtype, limit
        self.writer = import_streaming().MDSWriter(
            out=str(path),
            columns={COLUMN: f"ndarray:{dtype.name}:{seq_len}"},
            compression="zstd",
            hashes=["xxh64"],
            size_limit=shard_size,
        )
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.sequences = 0
        self.documents = 0
        self.tokens = 0  # all tokens that reached this split, eos included

    @property
    def full(self) -> bool:
        return self.limit is not None and self.sequences >= self.limit

    def add(self, tokens: np.ndarray, documents: int) -> None:
        if self.full or not len(tokens):
            return
        self.documents += documents
        self.tokens += len(tokens)
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        if self.pending_tokens < self.seq_len:
            return
        stream = np.concatenate(self.pending)
        whole = len(stream) // self.seq_len
        if self.limit is not None:
            whole = min(whole, self.limit - self.sequences)
        for i in range(whole):
            self.writer.write({COLUMN: stream[i * self.seq_len : (i + 1) * self.seq_len]})
        self.sequences += whole
        rest = stream[whole * self.seq_len :] if not self.full else stream[:0]
        self.pending, self.pending_tokens = [rest], len(rest)

    def finish(self) -> dict:
        self.writer.finish()
        return {
            "sequences": self.sequences,
            "tokens": self.sequences * self.seq_len,
            "documents": self.documents,
            "dropped_tokens": self.tokens - self.sequences * self.seq_len,
        }


def document_parts(text: str, limit: int = MAX_DOCUMENT_CHARS) -> Iterator[str]:
    """``text``, or for a document longer than ``limit`` characters, parts of at most ``limit`` cut before a
    whitespace in the second half of each window (hard at ``limit`` when it has none). Each part is then a
    document of its own (its own eos and split): the tokenizer's time and memory stay bounded (a 50 MB line
    would take gigabytes and minutes in one piece)."""
    while len(text) > limit:
        cut = max((m.start() for m in WHITESPACE.finditer(text, limit // 2, limit)), default=limit) or limit
        yield text[:cut]
        text = text[cut:]
    yield text


def _batches(docs: Iterable[Document]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        for text in document_parts(doc.text, MAX_DOCUMENT_CHARS):
            batch.append(text)
            chars += len(text)
            if chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


class Tokenizers:
    """Tokenizes batches of documents in order: in this process for one worker, else in a pool of
    processes with bounded look-ahead (Pool.imap would read the whole corpus into memory ahead)."""

    def __init__(self, workers: int, tokenizer: Tokenizer, val_fraction: float, seed: int):
        self.workers, self.args = workers, (val_fraction, seed)
        self.pool = None
        if workers > 1:
            # fork on Linux: starts at once, where spawn (or forkserver) would re-import the caller's main
            # module in every worker (a training launcher: torch, deepspeed, ... for each of them)
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
        else:
            _init_worker(tokenizer)

    def map(self, batches: Iterable[list[str]]) -> Iterator[Encoded]:
        if self.pool is None:
            for texts in batches:
                yield encode_documents(texts, *self.args)
            return
        inflight: deque = deque()
        for texts in batches:
            inflight.append(self.pool.apply_async(encode_documents, (texts, *self.args)))
            if len(inflight) > 2 * self.workers:
                yield inflight.popleft().get()
        while inflight:
            yield inflight.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def prepare(
    corpus: str | Sequence[str],
    tokenizer: str | os.PathLike | Tokenizer,
    seq_len: int,
    out: str | os.PathLike,
    *,
    workers: int = 1,
    val_fraction: float = 0.01,
    seed: int = 0,
    max_tokens: int | None = None,
    shard_size: int = 1 << 26,
    overwrite: bool = False,
    progress: bool = True,
    option_names: dict[str, str] | None = None,
) -> dict:
    """Tokenize `corpus` into MDS shards under `out` (train/, val/, titans_data.json); returns the metadata.

    max_tokens stops once the train split holds max_tokens // seq_len sequences (a cap for quick runs).
    option_names: how errors name seq_len, val_fraction and no validation (default: this command's flags;
    a run's auto-prepare names its config keys).
    """
    out = Path(out)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    if seq_len < 2:
        raise DataError(f"--seq-len {seq_len} must be >= 2")
    if workers < 1:
        raise DataError(f"--workers {workers} must be >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if seed < 0:
        raise DataError(f"--seed {seed} must be >= 0")
    if max_tokens is not None and max_tokens < seq_len:
        raise DataError(f"--max-tokens {max_tokens} must be >= --seq-len {seq_len}")
    if tok.eos_id < 0:
        raise DataError(f"tokenizer {tok.path} has no end-of-sequence piece (eos_id = -1); documents need one between them")
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    paths = resolve_corpus(corpus)
    check_corpus(paths)

    dtype = token_dtype(tok.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(out):
        if progress:
            print(f"prepare: removed {stale}, left by an interrupted prepare", file=sys.stderr)
    tmp = _temporary(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    limit = max_tokens // seq_len if max_tokens is not None else None
    tokenizers = Tokenizers(workers, tok, val_fraction, seed)
    try:
        writers = {"train": SplitWriter(tmp / "train", seq_len, dtype, shard_size, limit)}
        if val_fraction > 0:
            writers["val"] = SplitWriter(tmp / "val", seq_len, dtype, shard_size)
        bar = Progress("prepare", enabled=progress)
        docs = chars = tokens = 0
        with contextlib.closing(tokenizers.map(_batches(iter_documents(paths)))) as encoded:
            for enc in encoded:
                writers["train"].add(enc.train, enc.train_docs)
                if "val" in writers:
                    writers["val"].add(enc.val, enc.val_docs)
                docs += enc.train_docs + enc.val_docs
                chars += enc.chars
                tokens += len(enc.train) + len(enc.val)
                bar.update(
                    f"{human(docs)} docs, {human(tokens)} tokens, {human(tokens / max(bar.elapsed, 1e-9))} tok/s, "
                    f"{writers['train'].sequences} train seqs"
                )
                if writers["train"].full:
                    break
        stats = {name: w.finish() for name, w in writers.items()}
        for name, s in stats.items():
            if s["sequences"] == 0:
                what = "the corpus" if name == "train" else "the validation split"
                n = option_names or CLI_OPTIONS
                fix = f"use a larger corpus or a smaller {n['seq_len']}" + (
                    f", a larger {n['val_fraction']} or {n['no_val']}" if name == "val" else "")
                raise DataError(f"{what} of {corpus} got {s['documents']} documents, {s['dropped_tokens']} tokens: fewer than one sequence of {seq_len}; {fix}")
        meta = {
            "format": FORMAT,
            "tokenizer": {"path": str(tok.path.resolve()), "sha256": tok.sha256, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id},
            "seq_len": seq_len,
            "dtype": dtype.name,
            "column": COLUMN,
            "eos_per_document": True,
            "splits": stats,
            "val_fraction": val_fraction,
            "seed": seed,
            "max_tokens": max_tokens,
            "source": {"corpus": corpus if isinstance(corpus, str) else list(corpus), "files": [str(p) for p in paths], "documents": docs, "chars": chars},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_atomic(tmp / META_NAME, (json.dumps(meta, indent=1) + "\n").encode())
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        tokenizers.close()
    bar.done(
        f"{human(docs)} docs, {human(tokens)} tokens in {bar.elapsed:.1f}s ({human(tokens / max(bar.elapsed, 1e-9))} tok/s): "
        + ", ".join(f"{name} {s['sequences']} x {seq_len}" for name, s in stats.items())
        + f" ({dtype.name}) -> {out}"
        + (" (capped by --max-tokens)" if limit is not None and stats["train"]["sequences"] >= limit else "")
    )
    return meta


def _temporary(out: Path, kind: str) -> Path:
    """Where this process builds ``out`` (kind "tmp") or moves an old one aside ("old"): beside it, hidden,
    named after this host and PID so that a later prepare can tell a killed one's leftovers."""
    return out.parent / f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}"


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the folders that prepares of ``out`` killed on this host left behind (their PID is gone);
    a prepare still running, or one on another host, keeps its own. Returns what was removed."""
    removed = []
    for kind in ("tmp", "old"):
        prefix = f".{out.name}.{kind}-"
        for path in out.parent.glob(f"{glob.escape(prefix)}*"):
            host, _, pid = path.name[len(prefix):].rpartition("-")
            if not pid.isdigit() or (host and host != socket.gethostname()) or _alive(int(pid)):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished directory into place; an old one is moved aside first, then removed."""
    old = None
    if out.exists():
        old = _temporary(out, "old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_metadata(data_dir: str | os.PathLike) -> dict:
    """titans_data.json of a prepared directory, or a DataError saying it is not one."""
    path = Path(data_dir) / META_NAME
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{data_dir} has no {META_NAME}: it is not a prepared data directory (or its prepare did not finish); "
            f"run `python -m titans_scale.data.prepare --corpus GLOB --tokenizer PATH --seq-len N --out {data_dir}`"
        ) from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is unreadable or not JSON ({err}); re-run prepare") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not titans_scale data metadata (format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    return meta


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m titans_scale.data.prepare",
        description="Tokenize a corpus into fixed-length sequences in MDS shards (DIR/train, DIR/val, DIR/titans_data.json).",
    )
    parser.add_argument("--corpus", required=True, action="append", help="parquet/jsonl/txt file, directory or glob (repeatable)")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--workers", type=int, default=max(1, min(os.cpu_count() or 1, 16)), help="tokenizer processes (default: all cores, at most 16)")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document-hash split")
    parser.add_argument("--max-tokens", type=float, default=None, help="stop once the train split holds this many tokens")
    parser.add_argument("--shard-size-mb", type=float, default=64, help="uncompressed shard size (default 64)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--version", action="version", version=version_text())
    args = parser.parse_args(argv)
    prepare(
        args.corpus if len(args.corpus) > 1 else args.corpus[0],
        args.tokenizer,
        args.seq_len,
        args.out,
        workers=args.workers,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_tokens=int(args.max_tokens) if args.max_tokens is not None else None,
        shard_size=int(args.shard_size_mb * (1 << 20)),
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    run_cli(main)
