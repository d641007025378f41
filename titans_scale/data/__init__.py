"""The data path: corpus readers, sentencepiece tokenizer, prepare (MDS shards), streaming loader, sample corpus.

corpus (parquet / jsonl / txt) -> tokenizer -> prepare -> shards (train/, val/, titans_data.json)
-> loader (StreamingDataset per data-parallel rank, exact resumption). See docs/data.md.

Names load on first use: `import titans_scale.data` stays cheap (no torch, no streaming) for the
tokenizer worker processes, and `python -m titans_scale.data.<command>` does not import its own module
twice. The prepare function lives at `titans_scale.data.prepare.prepare` (the name `prepare` here is
the module, as Python binds it).
"""

from __future__ import annotations

from titans_scale._lazy import lazy_getattr

_EXPORTS = {
    "DataConfig": "config",
    "data_root": "config",
    "resolve_data_dir": "config",
    "resolve_tokenizer": "config",
    "validate_data_config": "config",
    "DataError": "errors",
    "Document": "corpus",
    "iter_documents": "corpus",
    "resolve_corpus": "corpus",
    "Tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "read_metadata": "prepare",
    "TokenLoader": "loader",
    "build_train_loader": "loader",
    "build_val_loader": "loader",
    "check_shards": "loader",
    "build_sample_corpus": "sample",
    "ensure_default_data": "default",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
