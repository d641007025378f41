"""Sentencepiece tokenizers: train a LLaMA-style BPE model on a corpus, or load any existing `.model`.

Command: python -m titans_scale.data.tokenizer --corpus GLOB --vocab-size N --out PATH.model

LLaMA-style means: BPE, byte fallback (no text is ever <unk>), digits split one by one, unk=0, bos=1,
eos=2, and no normalization at all (identity rule, whitespace kept), so decode(encode(text)) == text for
any text. This module imports no torch, so that tokenizer worker processes start fast.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from titans_scale import version_text

from .errors import DataError, run_cli
from .files import write_atomic
from .progress import Progress, human

# The trainer settings of LLaMA / LLaMA-2's tokenizer (read from its model proto), vocab size aside.
LLAMA_STYLE = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    allow_whitespace_only_pieces=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    character_coverage=0.99995,
)
MAX_SENTENCE_CHARS = 4096  # training "sentences" are lines, cut to this many characters
MIN_VOCAB = 256 + 3 + 1  # byte pieces, unk/bos/eos, and at least one learned piece


class Tokenizer:
    """A sentencepiece model with the few things the data path needs, tied to its file by sha256."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            proto = self.path.read_bytes()
        except FileNotFoundError:
            raise DataError(
                f"tokenizer {self.path} does not exist; train one with "
                f"`python -m titans_scale.data.tokenizer --corpus GLOB --vocab-size N --out {self.path}`"
            ) from None
        except OSError as err:
            raise DataError(f"tokenizer {self.path}: cannot read it ({err.strerror})") from None
        self._load(proto)

    def _load(self, proto: bytes) -> None:
        self.proto = proto
        self.sha256 = hashlib.sha256(proto).hexdigest()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except Exception:  # sentencepiece raises a bare RuntimeError/OSError with a C++ message
            raise DataError(f"tokenizer {self.path} is not a sentencepiece model file (.model)") from None
        if self.sp.vocab_size() == 0:
            raise DataError(f"tokenizer {self.path} is not a sentencepiece model file (.model)")
        self._newline_prefix = self._newline_cut_prefix()

    def __reduce__(self):
        return (_tokenizer_from_proto, (str(self.path), self.proto))

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of each text, exactly; long texts go in pieces cut at newlines (see _newline_cut_prefix)."""
        if self._newline_prefix is None:
            return self.sp.encode(list(texts))
        pieces, owners = [], []
        for i, text in enumerate(texts):
            for piece in _cut_at_newlines(text):
                pieces.append(piece)
                owners.append(i)
        out: list[list[int]] = [[] for _ in texts]
        skip = len(self._newline_prefix)
        for i, (owner, ids) in enumerate(zip(owners, self.sp.encode(pieces))):
            first = i == 0 or owners[i - 1] != owner
            out[owner].extend(ids if first else ids[skip:])
        return out

    def _newline_cut_prefix(self) -> list[int] | None:
        """Sentencepiece BPE slows down on long texts (about 2x at 16k characters, 4x at 256k). When no
        piece of the vocabulary contains a newline (LLaMA-style models: it is a byte-fallback token), no
        merge crosses one, so a text encodes as its parts cut before newlines, except that each later part
        gets the dummy-prefix tokens that encode() puts at the start of a text. Returns those tokens when
        that holds for this model (checked on probes), else None: then texts are encoded whole."""
        sp = self.sp
        if any("\n" in sp.id_to_piece(i) for i in range(sp.vocab_size()) if not sp.is_byte(i)):
            return None
        newline = sp.encode("\n")
        if not newline or not sp.is_byte(newline[-1]):
            return None
        prefix = newline[:-1]
        for probe in ("a\nb", " x \n\n  y\n", "\r\nz\n\t1 2", "\nq"):
            head, _, tail = probe.partition("\n")
            parts = (sp.encode(head) if head else prefix) + sp.encode("\n" + tail)[len(prefix) :]
            if sp.encode("\n" + tail)[: len(prefix)] != prefix or parts != sp.encode(probe):
                return None
        return prefix

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


CUT_CHARS = 1024  # texts are cut at the first newline after every CUT_CHARS characters


def _cut_at_newlines(text: str) -> list[str]:
    """text as parts: the first, then each starting at a newline, each at least CUT_CHARS long."""
    parts, start = [], 0
    while True:
        cut = text.find("\n", start + CUT_CHARS)
        if cut < 0:
            parts.append(text[start:])
            return parts
        parts.append(text[start:cut])
        start = cut


def _tokenizer_from_proto(path: str, proto: bytes) -> Tokenizer:
    tok = Tokenizer.__new__(Tokenizer)
    tok.path = Path(path)
    tok._load(proto)
    return tok


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (ids < vocab_size <= 65536), int32 otherwise."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def training_sentences(texts: Iterable[str], max_chars: int, progress: Progress) -> Iterator[str]:
    """Lines of the documents (sentencepiece's unit of training), cut to MAX_SENTENCE_CHARS, up to
    max_chars characters in all. Newlines themselves are left to byte fallback, as in LLaMA."""
    docs = chars = 0
    for text in texts:
        docs += 1
        for line in text.split("\n"):
            for start in range(0, len(line), MAX_SENTENCE_CHARS):
                piece = line[start : start + MAX_SENTENCE_CHARS]
                if piece.strip():
                    chars += len(piece)
                    yield piece
        progress.update(f"read {human(docs)} docs, {human(chars)} chars ({human(chars / max(progress.elapsed, 1e-9))} chars/s)")
        if chars >= max_chars:
            break
    progress.update(f"read {human(docs)} docs, {human(chars)} chars; training", force=True)


def train_tokenizer(
    corpus: str | Sequence[str],
    vocab_size: int,
    out: str | os.PathLike,
    *,
    max_chars: int = 200_000_000,
    threads: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Tokenizer:
    """Train a LLaMA-style BPE tokenizer on the corpus (its first max_chars characters) and write it
    atomically to `out`. Same corpus, vocab size and seed give the same model file."""
    from .corpus import check_corpus, iter_documents, resolve_corpus

    out = Path(out)
    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is too small: byte fallback needs >= {MIN_VOCAB} (256 bytes + unk/bos/eos + 1)")
    if out.exists() and not overwrite:
        raise DataError(f"tokenizer {out} already exists; pass --overwrite to replace it (shards prepared with it will no longer match)")
    paths = resolve_corpus(corpus)
    check_corpus(paths)
    bar = Progress("tokenizer", enabled=progress)
    sentences = _Guarded(training_sentences((d.text for d in iter_documents(paths)), max_chars, bar))
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            input_sentence_size=0,
            max_sentence_length=4 * MAX_SENTENCE_CHARS,  # bytes
            num_threads=threads or min(os.cpu_count() or 1, 16),
            minloglevel=2,
            **LLAMA_STYLE,
        )
    except RuntimeError as err:  # e.g. "Vocabulary size too high (8000). Please set it to a value <= 5000."
        if sentences.error is not None:  # sentencepiece turns errors of the corpus readers into RuntimeError
            raise sentences.error from None
        reason = str(err).strip().splitlines()[-1].rsplit("] ", 1)[-1]  # drop the C++ file/line/condition prefix
        where = corpus if isinstance(corpus, str) else " ".join(corpus)
        raise DataError(f"sentencepiece could not train a vocab of {vocab_size} on {where}: {reason}") from None
    write_atomic(out, model.getvalue())
    tok = Tokenizer(out)
    bar.done(f"wrote {out} (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]}) in {bar.elapsed:.1f}s")
    return tok


class _Guarded:
    """Keeps an exception raised while iterating, which sentencepiece would flatten into RuntimeError."""

    def __init__(self, items: Iterator[str]):
        self.items = items
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self.items
        except BaseException as err:
            self.error = err
            raise


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m titans_scale.data.tokenizer",
        description="Train a LLaMA-style sentencepiece BPE tokenizer (byte fallback, split digits, unk=0 bos=1 eos=2).",
    )
    parser.add_argument("--corpus", required=True, action="append", help="parquet/jsonl/txt file, directory or glob (repeatable)")
    parser.add_argument("--vocab-size", type=int, required=True, help="32000 for the paper recipes, e.g. 8000 for tiny runs")
    parser.add_argument("--out", required=True, help="where to write the .model file")
    parser.add_argument("--max-chars", type=float, default=2e8, help="train on the corpus's first N characters (default 2e8)")
    parser.add_argument("--threads", type=int, default=None, help="sentencepiece trainer threads (default: all cores, at most 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer file")
    parser.add_argument("--version", action="version", version=version_text())
    args = parser.parse_args(argv)
    train_tokenizer(args.corpus, args.vocab_size, args.out, max_chars=int(args.max_chars), threads=args.threads, seed=args.seed, overwrite=args.overwrite)


if __name__ == "__main__":
    run_cli(main)
