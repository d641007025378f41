"""The launcher: who is a worker (torchrun, the deepspeed launcher, srun), and bad inputs refused with one
clear line before any training step (a world that does not divide the batch or the parallel sizes, shards
made with another tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import data_make_documents
from test_train import SEQ, shards, train_args, train_launch, train_main  # noqa: F401 (shards is a fixture)

from titans_scale.train.distributed import launcher_env


def test_launcher_environments():
    assert launcher_env({}) is None
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}
    assert launcher_env(torchrun) == {k: torchrun[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
            "MASTER_ADDR": "node1"}
    assert launcher_env(srun) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node1",
                                  "MASTER_PORT": str(20000 + 1234)}
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}  # sbatch's shell, not a task
    assert launcher_env(batch_script) is None


def assert_refused_before_training(result, *needles: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result
    assert all(n in lines[0] for n in needles), result
    assert "[train]" not in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "overrides, needles",
    [
        ({"nproc": 3}, ["train.global_batch_tokens=512 is not a multiple of", "2 x 64 x 3 = 384", "nproc"]),
        ({"nproc": 3, "parallel__tp": 2}, ["world size 3 is not a multiple of parallel.tp * parallel.sp = 2 * 1"]),
    ],
)
def test_world_that_does_not_fit_is_refused(overrides, needles, shards, tmp_path, capsys):  # noqa: F811
    """Refused by the launcher's plan before any worker starts, so in this process (the two data tests below
    run the command itself)."""
    assert_refused_before_training(train_main(capsys, train_args(shards, tmp_path, **overrides)), *needles)


def test_a_data_dir_that_does_not_exist_is_refused(shards, tmp_path):  # noqa: F811
    """A mistyped data.data_dir is an error, not a run on the bundled sample prepared into it."""
    missing = tmp_path / "shardz"
    result = train_launch(train_args(shards, tmp_path / "run", data__data_dir=missing))
    assert_refused_before_training(result, f"data.data_dir={missing} does not exist", "data.corpus=GLOB")
    assert not missing.exists()


def test_shards_of_another_tokenizer_are_refused(shards, tmp_path):  # noqa: F811
    from titans_scale.data.tokenizer import train_tokenizer

    corpus = tmp_path / "other.jsonl"
    corpus.write_text("".join(json.dumps({"text": d.upper()}) + "\n" for d in data_make_documents(100, seed=9)))
    other = train_tokenizer(str(corpus), 500, tmp_path / "other.model", progress=False, threads=1)
    result = train_launch(train_args(shards, tmp_path / "run", data__tokenizer=other.path))
    assert_refused_before_training(result, "tokenizer", "vocab 500", "prepared with vocab 400")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dry_run_prints_the_plan(shards, tmp_path, capsys):  # noqa: F811
    """nproc=2 without starting a worker: the launcher plans in this process."""
    result = train_main(capsys, train_args(shards, tmp_path, dry_run="true", nproc=2))
    assert result.returncode == 0, result
    assert "[plan] mag:" in result.stdout and "world 2 (dp 2) | 6 steps of 512 tokens" in result.stdout
    assert "variant: mag" in result.stdout  # the resolved recipe
    assert not tmp_path.joinpath("checkpoints").exists()


def test_dry_run_without_data_estimates_from_the_recipe(tmp_path, capsys):
    """A paper recipe leaves its data open (???): the dry run still prints the config, plan and GPU-hours."""
    result = train_main(capsys, ["recipe=mac_760m", "dry_run=true", f"run_dir={tmp_path}"])
    assert result.returncode == 0, result
    assert "[config] recipe 'mac_760m' resolved" in result.stdout and "seq_len: 4096" in result.stdout
    assert "[data] not checked: data.data_dir, data.tokenizer left open" in result.stdout
    assert "[plan] mac: 757.1M parameters" in result.stdout and "GPU-hours at 40% MFU" in result.stdout
    # without dry_run the same command names what to set
    result = train_main(capsys, ["recipe=mac_760m", f"run_dir={tmp_path}"])
    assert_refused_before_training(result, "data.data_dir, data.tokenizer must be set", "dry_run=true")


@pytest.mark.parametrize("overrides, needles", [
    ({"data__seq_len": 128}, ["data.seq_len=128 but the shards in", "hold sequences of 64", "set data.seq_len=64"]),
    ({"data__vocab_size": 512}, ["made with a 400-token tokenizer", "data.vocab_size=512", "set data.vocab_size=400"]),
])
def test_dry_run_refuses_shards_that_do_not_fit_the_recipe(overrides, needles, shards, tmp_path, capsys):  # noqa: F811
    result = train_main(capsys, train_args(shards, tmp_path, dry_run="true", **overrides))
    assert_refused_before_training(result, *needles)


def test_auto_prepare_errors_name_the_run_keys_in_one_line(tmp_path):
    """Data prepared by the run itself (data.corpus): its errors name the run's keys (data.val_fraction, not
    prepare's --val-fraction), once, with no second line from the launcher about the stopped workers; shards
    without a validation split train with train.eval_batches=0."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in data_make_documents(200, seed=5)))
    args = ["recipe=tiny", f"data.corpus={corpus}", "data.vocab_size=400", f"data.seq_len={SEQ}", "model.dim=32",
            "model.n_layers=1", "train.steps=1", f"train.global_batch_tokens={4 * SEQ}", "train.micro_batch=2",
            "train.sample_tokens=0", "wandb.mode=disabled", "nproc=2"]
    env = {"TITANS_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}

    def errors(result) -> list[str]:
        return [line for line in result.stderr.splitlines() if line.startswith("error")]

    tiny_val = train_launch(args + ["data.val_fraction=0.001", f"run_dir={tmp_path / 'a'}"], env=env)
    assert tiny_val.returncode == 2 and len(errors(tiny_val)) == 1, tiny_val
    assert "a larger data.val_fraction or data.val_fraction=0 with train.eval_batches=0" in errors(tiny_val)[0]
    assert "--val-fraction" not in tiny_val.stderr
    no_val = train_launch(args[:-1] + ["nproc=1", "data.val_fraction=0", f"run_dir={tmp_path / 'b'}"], env=env)
    assert no_val.returncode == 2 and len(errors(no_val)) == 1, no_val
    assert "have no validation split (they were auto-prepared with data.val_fraction=0)" in errors(no_val)[0]
    assert "train.eval_batches=0" in errors(no_val)[0] and "[train]" not in no_val.stdout
    trained = train_launch(args[:-1] + ["nproc=1", "data.val_fraction=0", "train.eval_batches=0",
                                        f"run_dir={tmp_path / 'c'}"], env=env)
    assert trained.returncode == 0 and "[train] step 1/1" in trained.stdout, trained


def test_every_command_tells_its_version_and_which_copy_runs(capsys):
    import importlib

    import titans_scale

    expected = f"titans_scale {titans_scale.__version__} ({Path(titans_scale.__file__).parent})\n"
    for module in ("launch", "submit", "eval.__main__", "generate", "export", "data.prepare", "data.tokenizer"):
        main = importlib.import_module(f"titans_scale.{module}").main
        try:
            code = main(["--version"])
        except SystemExit as done:  # argparse's version action
            code = done.code
        assert code in (0, None) and capsys.readouterr().out == expected, module
