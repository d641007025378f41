"""Typed configuration of the data path: where shards live, how they are streamed, how to auto-prepare."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import DataError


@dataclass
class SyntheticConfig:
    """A long-range synthetic task generated in place of a text corpus (``synthetic.py``); task "": the corpus."""

    task: str = ""  # recall | passkey | copy; "" = train on text shards
    items: int = 16  # recall: key-value pairs; passkey: digits; copy: tokens to copy
    distance: int = 128  # every answer is at least this many tokens after what it recalls
    val_samples: int = 64  # sequences of the validation split (and of the recall eval by default)
    seed: int = 0
    loss: str = "answers"  # answers: train (and validate) on the answers only; all: on every next token


@dataclass
class DataConfig:
    """What the training engine needs to stream token batches; None paths mean the bundled sample."""

    data_dir: Optional[str] = None  # prepared shards (titans_data.json, train/, val/); None = automatic
    remote: Optional[str] = None  # shards at any URL streaming reads (s3://, gs://, oci://, hf://, a path)
    cache_dir: Optional[str] = None  # local copy of `remote` shards; None = <data root>/cache/<hash of remote>
    tokenizer: Optional[str] = None  # sentencepiece .model; None = one trained on the corpus at first use
    alphabet: Optional[str] = None  # dna: one token per base (A C G T N; data/dna.py), FASTA corpus, no training
    seq_len: int = 512  # tokens per training sample (the model shifts inside the sample)
    num_workers: int = 2  # DataLoader worker processes per rank
    shuffle: bool = True  # shuffle the train split (validation is never shuffled)
    shuffle_seed: int = 9176  # default when build_train_loader gets no seed
    num_canonical_nodes: Optional[int] = None  # streaming's shuffle unit; None = streaming's default
    verify_shards: str = "hash"  # at loader start: "hash" (xxh64 of local shards), "size", or "none"
    # Auto-prepare (ensure_default_data), when data_dir has no prepared shards yet:
    corpus: Optional[str] = None  # glob of parquet/jsonl/txt/FASTA files; None = the bundled Wikipedia sample
    #                               (with alphabet=dna: a generated genome)
    vocab_size: int = 8000  # of the tokenizer trained when `tokenizer` does not exist yet
    val_fraction: float = 0.05  # share of documents (by content hash) held out for validation
    split_seed: int = 0  # seed of that document-hash split
    prepare_workers: int = 2  # tokenizer processes of prepare
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # a synthetic task instead of shards


def data_root() -> Path:
    """Where generated data goes by default: $TITANS_DATA_DIR, else ./data (git-ignored in the checkout)."""
    return Path(os.environ.get("TITANS_DATA_DIR") or "data")


def sample_dir() -> Path:
    """Where the bundled sample corpus and everything derived from it by default live."""
    return data_root() / "sample"


def resolve_tokenizer(cfg: DataConfig) -> Path:
    """The tokenizer the config names, else where ensure_default_data trains one: beside the sample
    (sample/tokenizer-v<vocab>.model), or for a corpus glob under <data root>/auto/<hash of glob>/; the
    DNA tokenizer (alphabet=dna) is <data root>/dna/tokenizer-dna.model."""
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    if cfg.alphabet == "dna":
        return dna_dir() / "tokenizer-dna.model"
    return _auto_dir(cfg) / f"tokenizer-v{cfg.vocab_size}.model"


def resolve_data_dir(cfg: DataConfig) -> Path:
    """The prepared-shards directory: the local cache of `remote`, data_dir, or the automatic one."""
    if cfg.remote:
        return Path(cfg.cache_dir) if cfg.cache_dir else data_root() / "cache" / _short_hash(cfg.remote)
    if cfg.data_dir:
        return Path(cfg.data_dir)
    if cfg.tokenizer:
        tok = _short_hash(str(Path(cfg.tokenizer).resolve()))
    else:
        tok = cfg.alphabet or f"v{cfg.vocab_size}"
    return _auto_dir(cfg) / f"shards-{tok}-len{cfg.seq_len}"


def dna_dir() -> Path:
    """Where the DNA tokenizer and the generated DNA data live by default."""
    return data_root() / "dna"


def _auto_dir(cfg: DataConfig) -> Path:
    if cfg.corpus:
        return data_root() / "auto" / _short_hash(cfg.corpus)
    return dna_dir() / "genome" if cfg.alphabet == "dna" else sample_dir()


def validate_data_config(cfg: DataConfig) -> None:
    """The one place that checks a DataConfig; raises DataError naming the field and the fix."""
    if cfg.seq_len < 2:
        raise DataError(f"data.seq_len={cfg.seq_len} must be >= 2 (the model predicts token t+1 from t)")
    if cfg.num_workers < 0:
        raise DataError(f"data.num_workers={cfg.num_workers} must be >= 0")
    if cfg.prepare_workers < 1:
        raise DataError(f"data.prepare_workers={cfg.prepare_workers} must be >= 1")
    if cfg.shuffle_seed < 0 or cfg.split_seed < 0:
        raise DataError("data.shuffle_seed and data.split_seed must be >= 0")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction={cfg.val_fraction} must be in [0, 1)")
    if cfg.verify_shards not in ("hash", "size", "none"):
        raise DataError(f"data.verify_shards={cfg.verify_shards!r} must be 'hash', 'size' or 'none'")
    if cfg.alphabet not in (None, "dna"):
        raise DataError(f"data.alphabet={cfg.alphabet!r} is unknown; use dna (one token per base) or null (sentencepiece)")
    if cfg.alphabet is None and cfg.vocab_size < 260 and not cfg.synthetic.task:
        raise DataError(f"data.vocab_size={cfg.vocab_size} must be >= 260 (256 byte pieces + unk/bos/eos + 1)")
    if cfg.num_canonical_nodes is not None and cfg.num_canonical_nodes < 1:
        raise DataError(f"data.num_canonical_nodes={cfg.num_canonical_nodes} must be >= 1 or null")


def check_named_tokenizer(cfg: DataConfig) -> None:
    """A tokenizer the config names must exist (only an unnamed one is trained on first use): a typo must not
    become a new tokenizer. Called before any worker starts and by ensure_default_data."""
    if cfg.tokenizer and not Path(cfg.tokenizer).is_file():
        raise DataError(
            f"data.tokenizer={cfg.tokenizer} does not exist; train one with `python -m titans_scale.data.tokenizer "
            f"--corpus GLOB --vocab-size N --out {cfg.tokenizer}`, or leave data.tokenizer unset to have one trained on "
            f"the corpus")


def _short_hash(text: str) -> str:
    return hashlib.blake2s(text.encode(), digest_size=8).hexdigest()
