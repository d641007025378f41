"""ensure_default_data: make the shards a config names exist, building the sample corpus, a small
tokenizer and the shards on first use (about 10 s on 2 cores for the sample)."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .config import DataConfig, check_named_tokenizer, resolve_data_dir, resolve_tokenizer, validate_data_config
from .errors import DataError
from .prepare import META_NAME, prepare
from .tokenizer import Tokenizer, train_tokenizer

# how prepare's errors name its options when a run prepares the data (config keys, not command flags)
RUN_OPTIONS = {"seq_len": "data.seq_len", "val_fraction": "data.val_fraction",
               "no_val": "data.val_fraction=0 with train.eval_batches=0 (no validation)"}


def ensure_default_data(cfg: DataConfig, *, progress: bool = True) -> Path:
    """The prepared-shards directory of `cfg`, preparing it first when it does not exist yet: corpus =
    cfg.corpus or the bundled sample (the sample only into the automatic directory: a data_dir the user
    named must exist unless a corpus is given too); tokenizer = the one cfg names (it must exist), else one trained
    here (cfg.vocab_size) at the automatic path. Safe to call from every process of a machine at once (a file lock serializes them);
    on several machines without a shared file system, call it on each. Remote data is never prepared."""
    validate_data_config(cfg)
    check_named_tokenizer(cfg)
    data_dir = resolve_data_dir(cfg)
    if cfg.alphabet == "dna" and not cfg.tokenizer:
        from .dna import dna_tokenizer

        with _file_lock(_lock_path(resolve_tokenizer(cfg))):
            dna_tokenizer(resolve_tokenizer(cfg))  # written once; the same file on every machine
    if cfg.remote or (data_dir / META_NAME).exists():
        return data_dir
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(data_dir.parent / f".{data_dir.name}.lock"):
        if (data_dir / META_NAME).exists():  # another process prepared it while we waited
            return data_dir
        if data_dir.exists():
            raise DataError(f"{data_dir} exists but holds no {META_NAME}: not prepared data; remove it or point data.data_dir elsewhere")
        if cfg.data_dir and not cfg.corpus:  # a path the user named: a typo must not become a sample run
            raise DataError(
                f"data.data_dir={cfg.data_dir} does not exist; point it at prepared shards (python -m "
                f"titans_scale.data.prepare --corpus ... --tokenizer ... --seq-len {cfg.seq_len} --out {cfg.data_dir}), "
                f"add data.corpus=GLOB to prepare them there now, or leave data.data_dir unset for the bundled sample"
            )
        if cfg.corpus:
            corpus: str = cfg.corpus
        elif cfg.alphabet == "dna":
            from .dna import GeneratedGenome

            corpus = str(GeneratedGenome().write(data_dir.parent / "generated.fa"))
        else:
            from .sample import build_sample_corpus

            corpus = str(build_sample_corpus(progress=progress))
        tok_path = resolve_tokenizer(cfg)
        tok = Tokenizer(tok_path) if tok_path.exists() else train_tokenizer(corpus, cfg.vocab_size, tok_path, progress=progress)
        prepare(corpus, tok, cfg.seq_len, data_dir, workers=cfg.prepare_workers, val_fraction=cfg.val_fraction,
                seed=cfg.split_seed, progress=progress, option_names=RUN_OPTIONS)
    return data_dir


def _lock_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent / f".{path.name}.lock"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
