"""Forecasting and DNA classification through the real engine (DeepSpeed ZeRO-1, gloo) at world size 2, in
one pair of processes: each task trains 2K steps (checkpoints every K), then resumes from step K in a fresh
run directory and must end bit-identical (every step's loss, the validation loss, the exported weights).
The first step's loss is the mean over both ranks' micro-batches of the initial model's loss, recomputed
here from the same loader partition: the data-parallel split and averaging are those of the language path.
The exported files then go through the eval commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from titans_scale.parallel.spawn import spawn

K = 2
SMALL_MODEL = ["model.dim=16", "model.n_heads=2", "model.n_layers=2", "model.persistent_tokens=2", "model.window=8",
               "model.segment_len=8", "model.memory.chunk_size=4", "model.memory.expansion=2"]
ENGINE = [f"train.steps={2 * K}", f"train.checkpoint_every={K}", f"train.eval_every={K}", "train.eval_batches=2",
          "train.micro_batch=4", "train.warmup_steps=2", "train.keep_last=5", "train.log_every=1", "wandb.mode=disabled"]
TASKS = {
    "forecast": ["recipe=ts_generated", "forecast.generated.rows=800", "forecast.generated.channels=2",
                 "data.seq_len=16", "forecast.horizon=8", "forecast.patch_len=4", "model.variant=mal",
                 "train.global_batch_tokens=256"],  # 4 windows x 16 steps x 2 ranks x 2 accumulated
    "classify": ["recipe=dna_classify", "classify.generated.length=64", "classify.generated.train=80",
                 "classify.generated.test=24", "data.seq_len=64", "model.variant=lmm",
                 "train.global_batch_tokens=1024"],  # 4 sequences x 64 bases x 2 ranks x 2 accumulated
}


def _train(rank: int, world: int, runs: list[list[str]]) -> list[dict]:
    """Train each run in turn on the process group the spawn made (the launcher's ``train`` without leaving it)."""
    from titans_scale.config import resolve
    from titans_scale.train.distributed import init_distributed
    from titans_scale.train.engine import Trainer, checked_plan

    results = []
    for args in runs:
        cfg = resolve(args)
        world_info = init_distributed(cfg.parallel)
        trainer = Trainer(cfg, checked_plan(cfg, world_info), world_info)
        try:
            results.append(trainer.fit())
            trainer.finish()
        finally:
            trainer.close()
    return results


def losses(run_dir: Path) -> tuple[dict, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in rows if "loss" in r}, {r["step"]: r["val_loss"] for r in rows if "val_loss" in r})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("beyond")
    os.environ["TITANS_DATA_DIR"] = str(root / "data")  # the spawned ranks inherit it
    plan, dirs = [], {}
    for task, args in TASKS.items():
        straight, resumed = root / f"{task}_straight", root / f"{task}_resumed"
        plan.append(args + SMALL_MODEL + ENGINE + [f"run_dir={straight}"])
        plan.append(args + SMALL_MODEL + ENGINE + [f"run_dir={resumed}",
                                                   f"resume={straight / 'checkpoints' / f'step_{K:08d}'}"])
        dirs[task] = (straight, resumed, plan[-2])
    try:
        spawn(_train, 2, plan)
    finally:
        del os.environ["TITANS_DATA_DIR"]
    return root, dirs


@pytest.mark.parametrize("task", list(TASKS))
def test_data_parallel_run_resumes_exactly(runs, task, monkeypatch):
    from titans_scale.config import resolve
    from titans_scale.tasks import get_task
    from titans_scale.train.checkpoint import load_model

    root, dirs = runs
    straight, resumed, args = dirs[task]
    (loss, val), (loss_r, val_r) = losses(straight), losses(resumed)
    assert sorted(loss) == list(range(1, 2 * K + 1)) and sorted(loss_r) == list(range(K + 1, 2 * K + 1))
    assert all(loss_r[s] == loss[s] for s in loss_r) and val_r[2 * K] == val[2 * K]
    a, b = load_model(straight / "model.pt")[0].state_dict(), load_model(resumed / "model.pt")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # step 1: the mean of the initial model's loss over rank 0's and rank 1's two micro-batches each
    monkeypatch.setenv("TITANS_DATA_DIR", str(root / "data"))
    cfg = resolve(args)
    task_ = get_task(cfg.task)
    torch.manual_seed(cfg.train.seed)
    model = task_.build_model(cfg)
    first = []
    for rank in range(2):
        train_loader, _ = task_.loaders(cfg, micro_batch=4, dp_rank=rank, dp_size=2, seed=cfg.train.seed)
        batches = iter(train_loader)
        with torch.no_grad():
            first += [model.loss(*task_.on_device(next(batches), torch.device("cpu"))) for _ in range(2)]
    expected = torch.stack(first).double().mean().item()
    assert loss[1] == pytest.approx(expected, rel=1e-5), (loss[1], expected)  # float32 sums in another order


def test_eval_commands_score_the_exported_models(runs, monkeypatch, capsys):
    from titans_scale.eval.__main__ import main

    root, dirs = runs
    monkeypatch.setenv("TITANS_DATA_DIR", str(root / "data"))
    assert main(["forecast", "--checkpoint", str(dirs["forecast"][0]), "--horizons", "4,8"]) == 0
    out = capsys.readouterr().out
    assert "| horizon |" in out and "MSE / optimum" in out and "\n| 4 " in out and "\n| 8 " in out
    record = json.loads((dirs["forecast"][0] / "eval" / "forecast.json").read_text())
    assert [r["horizon"] for r in record["results"]] == [4, 8] and record["optimum_mse"] > 0
    assert main(["classify", "--checkpoint", str(dirs["classify"][0] / "model.pt")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and json.loads((dirs["classify"][0] / "eval" / "classify.json").read_text())["sequences"] == 24
    assert main(["classify", "--checkpoint", str(dirs["forecast"][0])]) == 2
    assert capsys.readouterr().err.startswith("error: ") and "is a model of task=forecast, not classify; evaluate it with python -m titans_scale.eval forecast"
