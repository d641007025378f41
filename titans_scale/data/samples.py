"""Batches of in-memory samples for one data-parallel rank, with exact resumption (forecasting windows,
classification sequences: data sets that fit in memory, where the token path streams shards).

An epoch is a seeded permutation of the samples (the identity when not shuffled), cut into global batches
of ``micro_batch x dp_size`` samples (the tail that fills no global batch is dropped, so every rank yields
the same number of batches); rank r takes the r-th micro-batch of each. ``state_dict()`` is (epoch, batches
taken); a fresh loader given it continues exactly where the other stopped, like the token loader.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

from .errors import DataError


class Samples(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray): ...


class SampleLoader:
    """Iterating it once is one epoch (from where it stands); ``batch(indices)`` of the samples makes a batch."""

    def __init__(self, samples: Samples, *, micro_batch: int, dp_rank: int, dp_size: int, shuffle: bool, seed: int,
                 name: str = "data"):
        if micro_batch < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"micro_batch={micro_batch} must be >= 1 and dp_rank={dp_rank} in [0, {dp_size})")
        self.samples, self.micro_batch, self.dp_rank, self.dp_size = samples, micro_batch, dp_rank, dp_size
        self.shuffle, self.seed, self.name = shuffle, seed, name
        self.batches_per_epoch = len(samples) // (micro_batch * dp_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"the {name} has {len(samples)} samples, fewer than one global batch ({micro_batch} x "
                            f"{dp_size} data-parallel ranks); lower train.micro_batch or use more data")
        self.epoch, self.taken = 0, 0

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.samples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator:
        if self.taken >= self.batches_per_epoch:  # a state taken right after an epoch's last batch
            self.epoch, self.taken = self.epoch + 1, 0
        order = self.order(self.epoch)
        global_batch = self.micro_batch * self.dp_size
        while self.taken < self.batches_per_epoch:
            first = self.taken * global_batch + self.dp_rank * self.micro_batch
            self.taken += 1
            yield self.samples.batch(order[first : first + self.micro_batch])
        self.epoch, self.taken = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken, "global_batch": self.micro_batch * self.dp_size,
                "samples": len(self.samples), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "taken" not in state:
            raise DataError("the checkpoint's loader state is not a SampleLoader's (written by another kind of run?)")
        here = self.state_dict()
        for key, what in (("global_batch", "global batch (micro_batch x dp ranks)"), ("samples", "number of samples")):
            if state[key] != here[key]:
                raise DataError(f"the checkpoint's loader state has a {what} of {state[key]}, this run {here[key]}; "
                                f"resume with the same data and batch to continue exactly")
        self.epoch, self.taken = state["epoch"], state["taken"]
