"""The streaming loader: prepared MDS shards -> LongTensor batches (B, seq_len) for one data-parallel rank.

Built on mosaicml-streaming's StreamingDataset and StreamingDataLoader:
- local shards (data_dir) or remote ones (any URL streaming reads, copied into cache_dir);
- seeded shuffling (streaming's py1e, reseeded each epoch);
- the epoch is partitioned over the *data-parallel* group given explicitly (dp_rank, dp_size): ranks
  that share a dp_rank (tensor/sequence-parallel peers) see the same samples, whatever the rank layout;
- `state_dict()` / `load_state_dict()` resume exactly: a resumed run sees the samples an uninterrupted
  run would have seen next.

Streaming coordinates the processes of one machine through shared memory and reads the launcher's
RANK / WORLD_SIZE / LOCAL_WORLD_SIZE for that (torchrun, deepspeed and submitit set them; when a
process group is up without them, they are filled in from it). Every process of the job must build
its loaders together (streaming synchronizes them with barriers on the default process group).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import socket
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ._streaming import import_streaming
from .config import DataConfig, resolve_data_dir, resolve_tokenizer, validate_data_config
from .errors import DataError
from .prepare import COLUMN, META_NAME, read_metadata
from .tokenizer import Tokenizer

streaming = import_streaming()
from streaming.base.hashing import get_hash  # noqa: E402
from streaming.base.storage import CloudDownloader  # noqa: E402
from streaming.base.world import World  # noqa: E402

INDEX_NAME = "index.json"


# ----------------------------------------------------------------------------------------- checks
def check_shards(
    data_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer,
    *,
    verify: str = "hash",
    missing_ok: bool = False,
) -> dict:
    """Check that `data_dir` holds complete shards made with this tokenizer; returns its metadata.

    verify: "hash" compares every local shard file with the xxh64 in index.json, "size" only its
    length, "none" neither. Each process checks its share of the files (by local rank), so a machine
    reads every file once. missing_ok: shard files not yet downloaded (remote data) are fine.
    Raises a one-line DataError naming the file and the problem.
    """
    meta = read_metadata(data_dir)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    want = meta["tokenizer"]
    fix = f"use the tokenizer the shards were made with ({want['path']}) or re-run prepare with this one"
    if tok.vocab_size != want["vocab_size"]:
        raise DataError(f"tokenizer {tok.path} has vocab {tok.vocab_size}, but the shards in {data_dir} were prepared with vocab {want['vocab_size']}; {fix}")
    if tok.sha256 != want["sha256"]:
        raise DataError(
            f"tokenizer {tok.path} (sha256 {tok.sha256[:12]}) is not the one the shards in {data_dir} were prepared with "
            f"(sha256 {want['sha256'][:12]}); {fix}"
        )
    if verify not in ("hash", "size", "none"):
        raise DataError(f"verify={verify!r} must be 'hash', 'size' or 'none'")
    if verify != "none":
        share = (int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        for split in meta["splits"]:
            _check_split(Path(data_dir) / split, verify, missing_ok, share)
    return meta


def check_seq_len(meta: dict, cfg: DataConfig, where) -> None:
    """The shards hold sequences of the config's data.seq_len (a DataError naming both otherwise)."""
    if meta["seq_len"] != cfg.seq_len:
        raise DataError(f"data.seq_len={cfg.seq_len} but the shards in {where} hold sequences of {meta['seq_len']}; "
                        f"set data.seq_len={meta['seq_len']} or re-run prepare with --seq-len {cfg.seq_len}")


def _check_split(split_dir: Path, verify: str, missing_ok: bool, share: tuple[int, int]) -> None:
    index_path = split_dir / INDEX_NAME
    try:
        index = json.loads(index_path.read_text())
        shards = index["shards"]
    except FileNotFoundError:
        if missing_ok:
            return
        raise DataError(f"{index_path} is missing: the shards of {split_dir} are incomplete; re-run prepare") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{index_path} is corrupt ({type(err).__name__}); re-run prepare") from None
    rank, size = share
    for i, shard in enumerate(shards):
        if i % size != rank:
            continue
        infos = [shard.get("raw_data"), shard.get("zip_data")]
        present = 0
        for info in filter(None, infos):
            path = split_dir / info["basename"]
            if not path.is_file():
                continue
            present += 1
            actual = path.stat().st_size
            if actual != info["bytes"]:
                raise DataError(f"shard file {path} is corrupt: {actual} bytes, {index_path} says {info['bytes']}; re-run prepare")
            if verify == "hash" and "xxh64" in info.get("hashes", {}):
                if get_hash("xxh64", path.read_bytes()) != info["hashes"]["xxh64"]:  # shards are <= 64 MB
                    raise DataError(f"shard file {path} is corrupt: its xxh64 checksum does not match {index_path}; re-run prepare")
        if not present and not missing_ok:
            names = " or ".join(info["basename"] for info in filter(None, infos))
            raise DataError(f"shard {split_dir / names} is missing; re-run prepare")


def fetch_remote_metadata(remote: str, cache_dir: Path) -> None:
    """Copy <remote>/titans_data.json into the cache; a cache filled from a different version of the
    remote data is an error (its shards would be stale)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / META_NAME
    tmp = cache_dir / f".{META_NAME}.{os.getpid()}.tmp"
    try:
        CloudDownloader.direct_download(_join(remote, META_NAME), str(tmp))
    except Exception as err:  # each storage backend raises its own kinds of errors
        raise DataError(f"cannot fetch {_join(remote, META_NAME)} ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}); is data.remote a prepared data directory?") from None
    if cached.exists() and cached.read_bytes() != tmp.read_bytes():
        tmp.unlink()
        raise DataError(f"the shards at {remote} changed since cache {cache_dir} was filled; delete the cache directory (or set another data.cache_dir)")
    os.replace(tmp, cached)


def _join(remote: str, name: str) -> str:
    return remote.rstrip("/") + "/" + name


# ---------------------------------------------------------------------------------------- dataset

def _keep_parent_sigterm(worker_id: int) -> None:
    """torch makes its workers exit on SIGTERM (a C handler, set before this runs). Slurm sends SIGTERM to
    every process of a job step, and the rank must first finish its step and save (train/requeue.py): give
    the workers the rank's own handling back. They still exit with the rank."""
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))

class DataParallelStreamingDataset(streaming.StreamingDataset):
    """A StreamingDataset partitioned over an explicit data-parallel group.

    Streaming keeps two views of the world: a unique one (every process, for shared-memory
    coordination on a machine, read from RANK/WORLD_SIZE/LOCAL_WORLD_SIZE) and a parallel one (who
    gets which samples), which its `replication` knob derives only for consecutive ranks. Here the
    parallel view is the dp group itself (dp_rank of dp_size), so any layout of tensor/sequence
    parallel ranks works: each process takes the rows of dp_rank from the epoch's partition.
    """

    def __init__(self, *, dp_rank: int, dp_size: int, **kwargs: Any):
        super().__init__(**kwargs)
        unique = self._unique_rank_world
        nodes = unique.num_nodes if dp_size % unique.num_nodes == 0 else 1  # keep node locality when it divides
        self._parallel_rank_world = World(num_nodes=nodes, ranks_per_node=dp_size // nodes, workers_per_rank=1, worker=dp_rank)
        self.length = math.ceil(self.epoch_size / dp_size)


def _collate_tokens(samples: Sequence[dict]) -> torch.Tensor:
    return torch.from_numpy(np.stack([s[COLUMN] for s in samples]).astype(np.int64))


class TokenLoader(streaming.StreamingDataLoader):
    """Batches of token ids, LongTensor (micro_batch, seq_len), for one dp rank. Iterating it once is one
    epoch (the last partial batch is dropped, so every dp rank yields the same number of batches).

    state_dict() may be taken at any batch boundary on any rank (rank 0's is enough: all dp ranks are in
    lockstep); load_state_dict() on a fresh loader, before iterating, continues exactly there.
    """

    def __init__(self, dataset: DataParallelStreamingDataset, *, micro_batch: int, dp_size: int, num_workers: int, meta: dict, split: str,
                 timeout_s: float = 0.0):
        super().__init__(
            dataset,
            batch_size=micro_batch,
            num_workers=num_workers,
            collate_fn=_collate_tokens,
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
            # fork, as a launcher-started process would by default on Linux: a process that was itself
            # spawned would otherwise spawn its workers too, each re-importing torch and streaming
            worker_init_fn=_keep_parent_sigterm,
            multiprocessing_context="fork" if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods() else None,
            timeout=timeout_s if num_workers > 0 else 0,
        )
        self.dp_size = dp_size
        self.meta = meta
        self.split = split

    def endless(self) -> Iterator[torch.Tensor]:
        """Batches epoch after epoch (each reshuffled), for step-based training; state_dict() stays exact.
        One empty pass is normal (a run resumed exactly at the end of an epoch); two in a row are not."""
        empty_passes = 0
        while empty_passes < 2:
            empty_passes += 1
            for batch in self:
                empty_passes = 0
                yield batch
        raise DataError(f"the {self.split} loader yields no batch: fewer sequences per dp rank than micro_batch x num_workers?")

    @property
    def seq_len(self) -> int:
        return self.meta["seq_len"]

    @property
    def vocab_size(self) -> int:
        return self.meta["tokenizer"]["vocab_size"]

    def state_dict(self) -> dict:
        """Where the dp group is in the data: epoch and samples consumed so far by all dp ranks."""
        position = self.dataset.state_dict(self.num_samples_yielded * self.dp_size, False)
        return {"streaming": position, "split": self.split, "global_batch": self.batch_size * self.dp_size, "tokenizer_sha256": self.meta["tokenizer"]["sha256"]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "streaming" not in state:
            raise DataError("loader state is not a TokenLoader.state_dict() (no 'streaming' entry)")
        if state.get("tokenizer_sha256") not in (None, self.meta["tokenizer"]["sha256"]):
            raise DataError("the checkpoint's loader state was taken on shards of a different tokenizer; resume with the same data")
        global_batch = self.batch_size * self.dp_size
        if state.get("global_batch") not in (None, global_batch):
            raise DataError(
                f"the checkpoint's loader state was taken with a global batch of {state['global_batch']} samples, this run has "
                f"{global_batch} (micro_batch x dp_size); keep the global batch to resume exactly"
            )
        self.dataset.load_state_dict(state["streaming"])


# ---------------------------------------------------------------------------------------- builders
def build_train_loader(cfg: DataConfig, *, micro_batch: int, dp_rank: int, dp_size: int, seed: int | None = None,
                       timeout_s: float = 0.0) -> TokenLoader:
    """The training loader of one dp rank: shuffled with `seed` (cfg.shuffle_seed when None); a generated
    stream when ``cfg.synthetic.task`` is set (``synthetic.SyntheticLoader``, its own seed). With worker
    processes, `timeout_s` > 0 bounds the wait for a batch (streaming's workers wait for those of the other
    ranks of the machine at each epoch's start: a stopped rank must not hang the others forever)."""
    if cfg.synthetic.task:
        return _synthetic_loader(cfg, "train", micro_batch, dp_rank, dp_size)
    return _build_loader(cfg, "train", micro_batch, dp_rank, dp_size, shuffle=cfg.shuffle,
                         seed=cfg.shuffle_seed if seed is None else seed, timeout_s=timeout_s)


def build_val_loader(cfg: DataConfig, *, micro_batch: int, dp_rank: int, dp_size: int, timeout_s: float = 0.0) -> TokenLoader:
    """The validation loader of one dp rank: the val split in order, not shuffled (`timeout_s`: as above)."""
    if cfg.synthetic.task:
        return _synthetic_loader(cfg, "val", micro_batch, dp_rank, dp_size)
    return _build_loader(cfg, "val", micro_batch, dp_rank, dp_size, shuffle=False, seed=cfg.shuffle_seed, timeout_s=timeout_s)


def _synthetic_loader(cfg: DataConfig, split: str, micro_batch: int, dp_rank: int, dp_size: int):
    from .synthetic import SyntheticLoader

    return SyntheticLoader(cfg.synthetic, seq_len=cfg.seq_len, vocab=cfg.vocab_size, split=split, micro_batch=micro_batch,
                           dp_rank=dp_rank, dp_size=dp_size)


def _build_loader(cfg: DataConfig, split: str, micro_batch: int, dp_rank: int, dp_size: int, *, shuffle: bool, seed: int,
                  timeout_s: float = 0.0) -> TokenLoader:
    validate_data_config(cfg)
    if micro_batch < 1:
        raise DataError(f"micro_batch={micro_batch} must be >= 1")
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if seed < 0:
        raise DataError(f"seed={seed} must be >= 0 (streaming's shuffle seed)")
    _ensure_world_env()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size % dp_size:
        raise DataError(f"dp_size={dp_size} must divide the world size {world_size}")

    data_dir = resolve_data_dir(cfg)
    if cfg.remote:
        fetch_remote_metadata(cfg.remote, data_dir)
    meta = _agreed(lambda: check_shards(data_dir, resolve_tokenizer(cfg), verify=cfg.verify_shards, missing_ok=bool(cfg.remote)))
    check_seq_len(meta, cfg, cfg.remote or data_dir)
    if split not in meta["splits"]:
        raise DataError(f"{cfg.remote or data_dir} has no '{split}' split (prepared with --val-fraction 0?)")
    samples = meta["splits"][split]["sequences"]
    if samples < micro_batch * dp_size:
        raise DataError(f"the {split} split of {cfg.remote or data_dir} has {samples} sequences, fewer than one global batch ({micro_batch} x {dp_size} dp ranks)")

    try:
        dataset = DataParallelStreamingDataset(
            dp_rank=dp_rank,
            dp_size=dp_size,
            remote=cfg.remote,
            local=str(data_dir),
            split=split,
            batch_size=micro_batch,
            shuffle=shuffle,
            shuffle_seed=seed,
            num_canonical_nodes=cfg.num_canonical_nodes,
            validate_hash="xxh64",
        )
    except ValueError as err:
        if "Reused local directory" in str(err):
            raise DataError(
                f"cache directory {data_dir} is in use by another loader on this machine (another job, or an old loader of "
                "this process still alive); give this run its own data.cache_dir, or drop the old loader first"
            ) from None
        raise
    return TokenLoader(dataset, micro_batch=micro_batch, dp_size=dp_size, num_workers=cfg.num_workers, meta=meta, split=split,
                       timeout_s=timeout_s)


def _agreed(check):
    """Run a check on every process; if any fails, all raise the first failure (each process checks only
    its share of the shards, and the others must not wait for it at streaming's barriers)."""
    try:
        result, error = check(), None
    except DataError as err:
        result, error = None, str(err)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise DataError(error)
    return result


def _ensure_world_env() -> None:
    """Streaming reads RANK / WORLD_SIZE / LOCAL_WORLD_SIZE from the environment only: make them agree
    with an initialized process group (filling in what a launcher did not set)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, value in (("RANK", rank), ("WORLD_SIZE", world)):
        if name in os.environ and int(os.environ[name]) != value:
            raise DataError(f"environment {name}={os.environ[name]} disagrees with torch.distributed ({value}); launch with torchrun/deepspeed or unset it")
        os.environ[name] = str(value)
    if "LOCAL_WORLD_SIZE" not in os.environ or "LOCAL_RANK" not in os.environ:
        hosts: list[str] = [""] * world
        dist.all_gather_object(hosts, socket.gethostname())
        me = hosts[rank]
        os.environ["LOCAL_WORLD_SIZE"] = str(hosts.count(me))
        os.environ["LOCAL_RANK"] = str(hosts[:rank].count(me))
