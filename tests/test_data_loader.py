"""The streaming loader at world size 2 (gloo, two processes): disjoint ranks that cover the epoch, exact
resumption mid-epoch and across an epoch boundary, explicit data-parallel groups (tensor-parallel
peers share samples; any rank layout), and a bad shard found by one rank stopping all of them."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import data_make_documents

import titans_scale.data.loader  # noqa: F401  (imported before forking the ranks, so they start at once)

SEQ = 16
SEQUENCES = 96  # divisible by dp_size x micro_batch x num_workers = 2 x 4 x 2: the epoch is covered exactly
MICRO = 4


def data_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_rows(loader, batches: int | None = None) -> list[tuple[int, ...]]:
    """The samples a loader yields (each as a tuple of token ids), for `batches` batches or one epoch."""
    rows = []
    for i, batch in enumerate(loader):
        assert batch.shape == (MICRO, SEQ) and batch.dtype == torch.int64
        rows += [tuple(r) for r in batch.tolist()]
        if batches is not None and i + 1 == batches:
            break
    return rows


def data_rank_main(rank: int, world: int, port: int, data_dir: str, tokenizer: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from titans_scale.data import DataConfig, build_train_loader

    cfg = DataConfig(data_dir=data_dir, tokenizer=tokenizer, seq_len=SEQ, num_workers=2)

    def loader(dp_rank=rank, dp_size=world, **kw):
        return build_train_loader(kw.pop("cfg", cfg), micro_batch=MICRO, dp_rank=dp_rank, dp_size=dp_size, seed=17)

    result = {}
    uninterrupted = loader()
    result["epoch0"] = data_rows(uninterrupted)
    result["epoch1"] = data_rows(uninterrupted)  # the next epoch is reshuffled
    del uninterrupted

    stopped = loader()
    result["first3"] = data_rows(stopped, 3)
    state = stopped.state_dict()
    dist.barrier()
    del stopped
    resumed = loader()  # a fresh loader, as after a restart
    resumed.load_state_dict(json.loads(json.dumps(state)))  # checkpoints store it as plain data
    result["resumed"] = data_rows(resumed)

    across = loader()
    data_rows(across)
    data_rows(across, 2)
    state = across.state_dict()
    del across
    resumed = loader()
    resumed.load_state_dict(state)
    result["resumed_epoch1"] = data_rows(resumed)

    cfg0 = DataConfig(data_dir=data_dir, tokenizer=tokenizer, seq_len=SEQ, num_workers=0)
    result["tp_peers"] = data_rows(loader(dp_rank=0, dp_size=1, cfg=cfg0))  # both ranks in one dp group of 1
    result["swapped"] = data_rows(loader(dp_rank=world - 1 - rank))  # dp ranks laid out in reverse
    from titans_scale.data import DataError

    try:  # shard 1 is corrupt: only local rank 1 hashes it, yet every rank must stop with its message
        loader(cfg=DataConfig(data_dir=os.path.join(out, "corrupt"), tokenizer=tokenizer, seq_len=SEQ))
    except DataError as err:
        result["corrupt"] = str(err)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    atexit._run_exitfuncs()  # a forked child ends with os._exit: run streaming's shared-memory cleanup as a normal exit would


@pytest.fixture(scope="module")
def data_small_shards(tmp_path_factory, data_tokenizer_path):
    from titans_scale.data.prepare import prepare

    root = tmp_path_factory.mktemp("data_loader")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in data_make_documents(200, seed=11)))
    meta = prepare(str(corpus), data_tokenizer_path, SEQ, root / "shards", val_fraction=0.0, max_tokens=SEQUENCES * SEQ, shard_size=512, progress=False)
    assert meta["splits"]["train"]["sequences"] == SEQUENCES
    assert len(json.loads((root / "shards" / "train" / "index.json").read_text())["shards"]) > 1
    return root / "shards"


def test_two_ranks_disjoint_cover_and_resume_exactly(tmp_path, data_small_shards, data_tokenizer_path):
    shutil.copytree(data_small_shards, tmp_path / "corrupt")
    shard = tmp_path / "corrupt" / "train" / "shard.00001.mds.zstd"
    shard.write_bytes(shard.read_bytes()[::-1])
    args = (2, data_free_port(), str(data_small_shards), data_tokenizer_path, str(tmp_path))
    mp.start_processes(data_rank_main, args=args, nprocs=2, join=True, start_method="fork")  # fork: no re-import of torch
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    every = r0["tp_peers"]  # a dp group of one sees the whole epoch
    assert len(every) == SEQUENCES == len(set(every))
    for epoch in ("epoch0", "epoch1"):
        assert len(r0[epoch]) == len(r1[epoch]) == SEQUENCES // 2
        assert not set(r0[epoch]) & set(r1[epoch])  # disjoint
        assert set(r0[epoch]) | set(r1[epoch]) == set(every)  # together, the whole epoch
    assert r0["epoch0"] != r0["epoch1"]  # reshuffled each epoch

    for r in (r0, r1):
        assert r["first3"] == r["epoch0"][: 3 * MICRO]
        assert r["resumed"] == r["epoch0"][3 * MICRO :]  # exactly the rest of the uninterrupted epoch
        assert r["resumed_epoch1"] == r["epoch1"][2 * MICRO :]

    assert r0["tp_peers"] == r1["tp_peers"]  # ranks sharing a dp rank get the same samples
    assert r0["swapped"] == r1["epoch0"] and r1["swapped"] == r0["epoch0"]  # the partition follows dp_rank, not RANK
    assert r0["corrupt"] == r1["corrupt"] == f"shard file {shard} is corrupt: its xxh64 checksum does not match {shard.parent / 'index.json'}; re-run prepare"
