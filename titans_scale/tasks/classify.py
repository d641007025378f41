"""Sequence classification of DNA (GenomicsBenchmarks layout), optionally from a pretrained DNA model."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from titans_scale.config import ConfigError, config_diff, to_dict

from .base import Task
from .config import ClassifyConfig, MotifTaskConfig


def generated_task_dir(g: MotifTaskConfig) -> Path:
    from titans_scale.data.config import dna_dir

    digest = hashlib.blake2s(json.dumps(asdict(g), sort_keys=True).encode(), digest_size=6).hexdigest()
    return dna_dir() / f"motif-task-{digest}"


def ensure_generated(g: MotifTaskConfig) -> Path:
    """The generated long-range task's folder, written (whole, then renamed into place) on first use."""
    from titans_scale.data.default import _file_lock, _lock_path
    from titans_scale.data.dna import MotifTask

    root = generated_task_dir(g)
    with _file_lock(_lock_path(root)):
        if not root.exists():
            tmp = root.with_name(f".{root.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            MotifTask(**asdict(g)).write(tmp)
            os.replace(tmp, root)
    return root


def data_dir(c: ClassifyConfig) -> Path:
    return Path(c.data_dir) if c.data_dir else generated_task_dir(c.generated)


def dna_tokenizer_of(data_cfg):
    """The tokenizer a classification run reads DNA with: data.tokenizer, else the DNA tokenizer."""
    from titans_scale.data.config import resolve_tokenizer
    from titans_scale.data.dna import dna_tokenizer
    from titans_scale.data.tokenizer import Tokenizer

    if data_cfg.tokenizer:
        return Tokenizer(data_cfg.tokenizer)
    return dna_tokenizer(resolve_tokenizer(replace(data_cfg, alphabet="dna")))


class TokenSequences:
    """Labelled token sequences, right-padded to one length: a batch is (tokens, lengths, labels)."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, labels: np.ndarray):
        self.tokens, self.lengths, self.labels = tokens, lengths, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: np.ndarray):
        import torch

        i = np.asarray(indices)
        return (torch.from_numpy(self.tokens[i].astype(np.int64)), torch.from_numpy(self.lengths[i].astype(np.int64)),
                torch.from_numpy(self.labels[i]))

    def subset(self, indices: np.ndarray) -> "TokenSequences":
        return TokenSequences(self.tokens[indices], self.lengths[indices], self.labels[indices])


def encode(split_dir: Path, tokenizer, seq_len: int, classes: list[str] | None = None):
    """The sequences under ``split_dir`` as ``TokenSequences`` padded to ``seq_len``, and the class names;
    a sequence longer than ``seq_len`` is a one-line DataError naming the fix."""
    from titans_scale.data.dna import read_class_folders
    from titans_scale.data.errors import DataError

    read = read_class_folders(split_dir, classes)
    longest = max(len(s) for s in read.sequences)
    if longest > seq_len:
        raise DataError(f"{split_dir} holds sequences of up to {longest} bases, longer than data.seq_len={seq_len}; "
                        f"set data.seq_len={longest} (or more)")
    tokens = np.full((len(read.sequences), seq_len), tokenizer.eos_id, dtype=np.uint8)
    lengths = np.zeros(len(read.sequences), dtype=np.int64)
    for i, ids in enumerate(tokenizer.encode_batch(read.sequences)):
        tokens[i, : len(ids)] = ids
        lengths[i] = len(ids)
    return TokenSequences(tokens, lengths, read.labels), read.classes


@functools.lru_cache(maxsize=4)
def _load(root: str, tokenizer_path: str, seq_len: int, val_fraction: float, seed: int):
    from titans_scale.data.tokenizer import Tokenizer

    train, classes = encode(Path(root) / "train", Tokenizer(tokenizer_path), seq_len)
    order = np.random.default_rng([seed, 3]).permutation(len(train))
    n_val = max(1, int(round(len(train) * val_fraction)))
    return train.subset(np.sort(order[n_val:])), train.subset(np.sort(order[:n_val])), classes


def splits(cfg):
    """(train, validation, class names) of a run: the train folder less a seeded validation share."""
    tokenizer = dna_tokenizer_of(cfg.data)
    return _load(str(data_dir(cfg.classify)), str(tokenizer.path), cfg.data.seq_len, cfg.classify.val_fraction,
                 cfg.data.split_seed)


@dataclass
class Pretrained:
    """The weights a classifier starts from (``classify.init_from``)."""

    state_dict: dict
    config: dict


def read_pretrained(path: str) -> Pretrained:
    import torch

    from titans_scale.eval.checkpoint import model_path

    try:
        blob = torch.load(model_path(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"classify.init_from={path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(blob, dict) or blob.get("task", "lm") != "lm":
        raise ConfigError(f"classify.init_from={path} is not a language model's model.pt (pretrain with task=lm first)")
    return Pretrained(blob["state_dict"], blob["config"])


class Classification(Task):
    name = "classify"

    def check(self, cfg, build: bool) -> None:
        from titans_scale.data.errors import DataError

        if cfg.parallel.tp > 1 or cfg.parallel.sp > 1:
            raise ConfigError("task=classify runs data parallel only; set parallel.tp=1 parallel.sp=1")
        try:
            if build:
                if not cfg.classify.data_dir:
                    ensure_generated(cfg.classify.generated)
            tokenizer = dna_tokenizer_of(cfg.data)
            splits(cfg)
        except DataError as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"{tokenizer.vocab_size} tokens; set model.vocab_size={tokenizer.vocab_size}")
        if cfg.classify.init_from:
            diff = config_diff(read_pretrained(cfg.classify.init_from).config, to_dict(cfg.model))
            if diff:
                raise ConfigError(f"classify.init_from={cfg.classify.init_from} has another model config "
                                  f"({'; '.join(diff[:3])}); set the same model.* as its pretraining run")

    def build_model(self, cfg):
        from titans_scale.models.classify import SequenceClassifier

        model = SequenceClassifier(cfg.model, len(splits(cfg)[2]), cfg.classify.pooling)
        if cfg.classify.init_from:
            try:
                model.load_backbone(read_pretrained(cfg.classify.init_from).state_dict)
            except ValueError as e:
                raise ConfigError(f"classify.init_from={cfg.classify.init_from}: {e}") from None
        return model

    def loaders(self, cfg, *, micro_batch: int, dp_rank: int, dp_size: int, seed: int):
        from titans_scale.data.samples import SampleLoader

        train, val, _ = splits(cfg)
        args = dict(micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size, seed=seed)
        return (SampleLoader(train, shuffle=cfg.data.shuffle, name="train split", **args),
                SampleLoader(val, shuffle=False, name="validation split", **args))

    def stats(self, cfg) -> tuple[int, float]:
        import torch

        from titans_scale.models.classify import SequenceClassifier
        from titans_scale.models.stats import backbone_flops_per_token

        try:
            classes = len(splits(cfg)[2])
        except Exception:  # sizing only; check() reports data problems
            classes = 2
        with torch.device("meta"):
            params = sum(p.numel() for p in SequenceClassifier(cfg.model, classes, cfg.classify.pooling).parameters())
        return params, backbone_flops_per_token(cfg.model, cfg.data.seq_len)

    def export(self, cfg) -> dict:
        classes = splits(cfg)[2]
        return {"task": self.name, "task_config": {**asdict(cfg.classify), "classes": classes,
                                                   "seq_len": cfg.data.seq_len,
                                                   "tokenizer": str(dna_tokenizer_of(cfg.data).path)}}

    def model_from_export(self, model_cfg, task_config: dict):
        from titans_scale.models.classify import SequenceClassifier

        return SequenceClassifier(model_cfg, len(task_config["classes"]), task_config["pooling"])

    def summary(self, loss: float) -> str:
        return f"validation cross-entropy {loss:.4f}"
