"""Long-range synthetic tasks, generated instead of read from shards: the data of the ``recall_<variant>`` recipes.

    recall    multi-query associative recall (MQAR): ``items`` key-value pairs first, then every key asked again, in
              another order, at random places after ``distance``; the model must answer each key's value
    passkey   a pass-key of ``items`` digits after a marker, hidden in filler; at the end a query marker, then the
              key must be repeated
    copy      selective copying: ``items`` tokens scattered in filler; at the end a copy marker, then the tokens
              in order

Filler is a fixed cycle of a few tokens (predictable, like the repeated sentence of pass-key tests); every answer
is at least ``distance`` tokens after what it recalls, so with ``distance`` beyond the attention span only a
memory can answer. Sample ``i`` of a split is a pure function of (seed, split, i): the stream is deterministic
and a loader resumes exactly from the number of batches it yielded (``state_dict``).

Token ids: 0 unused, 1-8 the filler cycle, 9 query marker, 10 write marker, then the key alphabet and the value
alphabet, (vocab - 16) / 2 tokens each. ``vocab`` is the model's vocabulary (``data.vocab_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .config import SyntheticConfig
from .errors import DataError

TASKS = ("recall", "passkey", "copy")  # also in config.SyntheticConfig
FILLER = np.arange(1, 9)
QUERY, MARK = 9, 10
RESERVED = 16
SPLITS = {"train": 0, "val": 1}


@dataclass
class Sample:
    """One sequence: its tokens, the positions whose next-token prediction is scored, the answers there, and
    how far back each answer was written."""

    tokens: np.ndarray  # (seq_len,) int64
    positions: np.ndarray  # (n,) logits at these positions must predict ...
    answers: np.ndarray  # (n,) ... these tokens
    distances: np.ndarray  # (n,) tokens between the answer and the token it recalls


def alphabet_size(vocab: int) -> int:
    """Tokens in each of the key and value alphabets."""
    return (vocab - RESERVED) // 2


def check_task(cfg: SyntheticConfig, seq_len: int, vocab: int, spans: dict[str, int]) -> None:
    """Refuse, in one line each, a task that cannot be made or would not test a memory: unknown task, too few
    tokens in the alphabets for the items, a sequence too short, or a ``distance`` within an attention span
    (``spans``: name -> tokens a query sees, e.g. {"model.window": 64})."""
    if cfg.task not in TASKS:
        raise DataError(f"data.synthetic.task={cfg.task!r} is unknown; choose one of {', '.join(TASKS)} (or '' for the text corpus)")
    if cfg.loss not in ("answers", "all"):
        raise DataError(f"data.synthetic.loss={cfg.loss!r} must be answers or all")
    if cfg.items < 1 or cfg.distance < 1 or cfg.val_samples < 1 or cfg.seed < 0:
        raise DataError("data.synthetic.items, .distance and .val_samples must be >= 1 and .seed >= 0")
    size = alphabet_size(vocab)
    need = cfg.items if cfg.task == "recall" else 2  # distinct keys; passkey/copy draw with repetition
    if size < need or (cfg.task == "passkey" and size < 10):
        least = RESERVED + 2 * max(need, 10 if cfg.task == "passkey" else 2)
        raise DataError(f"data.vocab_size={vocab} is too small for data.synthetic.task={cfg.task} with items={cfg.items}: "
                        f"the key and value alphabets hold (vocab - {RESERVED}) / 2 = {size} tokens each; use data.vocab_size >= {least}")
    for name, span in spans.items():
        if cfg.distance <= span:
            raise DataError(f"data.synthetic.distance={cfg.distance} does not exceed {name}={span}: attention alone could answer; "
                            f"use data.synthetic.distance >= {4 * span} (4x the span) or a smaller {name}")
    if seq_len < _minimum_length(cfg):
        raise DataError(f"data.seq_len={seq_len} is too short for data.synthetic.task={cfg.task} with items={cfg.items} and "
                        f"distance={cfg.distance}; use data.seq_len >= {_minimum_length(cfg)}")


def answer_weights(tokens, cfg: SyntheticConfig, vocab: int):
    """(B, N - 1) float weights of the next-token targets of ``tokens`` (a torch batch of this task): 1 where the
    target is an answer, else 0. Read off the tokens themselves: a key after the pairs (recall) or anything from
    the query marker on (pass-key, copy) predicts an answer."""
    import torch

    inputs = tokens[:, :-1]
    if cfg.task == "recall":
        keys = (inputs >= RESERVED) & (inputs < RESERVED + alphabet_size(vocab))
        after = torch.arange(inputs.shape[1], device=tokens.device) >= 2 * cfg.items
        return (keys & after).float()
    return torch.cummax((inputs == QUERY).int(), dim=1).values.float()


def attention_spans(model) -> dict[str, int]:
    """The attention spans of a model config's layers, by the key that sets them: sliding windows
    (``model.window``: SWA, MAG, MAL and the plain layers of LMM) and MAC's segments (``model.segment_len``);
    full attention (Transformer++) has none."""
    kinds = set(model.layer_kinds())
    spans = {}
    if kinds & {"window", "mag", "mal"}:
        spans["model.window"] = model.window
    if "mac" in kinds:
        spans["model.segment_len"] = model.segment_len
    return spans


def _minimum_length(cfg: SyntheticConfig) -> int:
    """Writes, the distance, and room to spread the queries (recall) or the writes (pass-key, copy)."""
    if cfg.task == "recall":
        return 2 * cfg.items + cfg.distance + 4 * cfg.items
    return 3 * (cfg.items + 1) + cfg.distance


def make_sample(cfg: SyntheticConfig, seq_len: int, vocab: int, split: str, index: int) -> Sample:
    """Sample ``index`` of ``split``: the same arrays every time, on every machine."""
    rng = np.random.default_rng([cfg.seed, SPLITS[split], index])
    size = alphabet_size(vocab)
    keys, values = RESERVED, RESERVED + size
    tokens = FILLER[np.arange(seq_len) % len(FILLER)].astype(np.int64)
    n = cfg.items
    if cfg.task == "recall":  # MQAR (Zoology's layout): the pairs first, the queries scattered after the distance
        k = keys + rng.choice(size, n, replace=False)
        v = values + rng.integers(0, size, n)
        tokens[0 : 2 * n : 2], tokens[1 : 2 * n : 2] = k, v
        first = 2 * n + cfg.distance - 2  # a query at slot s answers at s + 1, >= distance after the last value
        slots = first + 2 * np.sort(rng.choice((seq_len - first) // 2, n, replace=False))
        order = rng.permutation(n)
        tokens[slots], tokens[slots + 1] = k[order], v[order]
        return Sample(tokens, slots, v[order], slots - 2 * order)  # the value of pair i sits at 2 i + 1
    digits = values + rng.integers(0, 10 if cfg.task == "passkey" else size, n)
    start = seq_len - n - 1
    tokens[start] = QUERY
    tokens[start + 1 :] = digits
    if cfg.task == "passkey":
        where = rng.integers(0, start - cfg.distance - n)
        tokens[where] = MARK
        tokens[where + 1 : where + 1 + n] = digits
        sources = where + 1 + np.arange(n)
    else:  # copy: the items at sorted random places
        sources = np.sort(rng.choice(start - cfg.distance, n, replace=False))
        tokens[sources] = digits
    positions = start + np.arange(n)  # the query marker predicts the first item, each item the next
    return Sample(tokens, positions, digits, positions + 1 - sources)


class SyntheticLoader:
    """Batches (micro_batch, seq_len) of one data-parallel rank, like ``TokenLoader``: the train split is an endless
    stream (global sample ``(batch * dp_size + dp_rank) * micro_batch + j``), the val split its ``val_samples``
    sequences once. ``state_dict`` / ``load_state_dict`` resume the stream exactly."""

    def __init__(self, cfg: SyntheticConfig, *, seq_len: int, vocab: int, split: str, micro_batch: int, dp_rank: int, dp_size: int):
        self.cfg, self.seq_len, self.vocab, self.split = cfg, seq_len, vocab, split
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.batches = 0  # batches yielded (train split)

    def _batch(self, first: int) -> torch.Tensor:
        rows = [make_sample(self.cfg, self.seq_len, self.vocab, self.split, first + j).tokens for j in range(self.micro_batch)]
        return torch.from_numpy(np.stack(rows))

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.split == "val":
            per_step = self.micro_batch * self.dp_size
            for b in range(self.cfg.val_samples // per_step):
                yield self._batch((b * self.dp_size + self.dp_rank) * self.micro_batch)
            return
        while True:
            batch = self._batch((self.batches * self.dp_size + self.dp_rank) * self.micro_batch)
            self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"synthetic": self.cfg.task, "batches": self.batches, "global_batch": self.micro_batch * self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("synthetic") != self.cfg.task:
            raise DataError(f"the checkpoint's loader state is not one of data.synthetic.task={self.cfg.task!r}; resume with the same data")
        if state["global_batch"] != self.micro_batch * self.dp_size:
            raise DataError(f"the checkpoint's loader state was taken with a global batch of {state['global_batch']} samples, this run has "
                            f"{self.micro_batch * self.dp_size} (micro_batch x dp_size); keep the global batch to resume exactly")
        self.batches = state["batches"]
