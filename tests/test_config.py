"""The run configuration: recipes with bases, dotted overrides, one typed schema, and the one-line errors a
user sees for an unknown key, a wrong type or a missing recipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from titans_scale.config import ConfigError, RunConfig, config_diff, data_parallel_size, resolve, to_dataclass, to_dict

ROOT = Path(__file__).resolve().parent.parent


def test_every_shipped_recipe_resolves():
    names = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert {"tiny", "mac", "mag", "mal", "lmm", "transformer", "swa"} <= set(names)
    for name in names:
        cfg = resolve([f"recipe={name}"])
        assert isinstance(cfg, RunConfig) and cfg.recipe == name and cfg.run_dir == f"runs/{name}"
        if name in ("mac", "mag", "mal", "lmm", "transformer", "swa"):
            assert cfg.model.variant == name
        assert cfg.model.vocab_size == cfg.data.vocab_size  # the base ties the model to the tokenizer's size


def test_tiny_is_the_default_and_overrides_win():
    cfg = resolve(["train.steps=7", "model.memory.chunk_size=8", "data.vocab_size=1000", "model.memory_layers=[0]"])
    assert cfg.recipe == "tiny" and cfg.model.variant == "mag"
    assert cfg.train.steps == 7 and cfg.model.memory.chunk_size == 8
    assert cfg.model.vocab_size == 1000  # ${data.vocab_size} is resolved after the overrides
    assert cfg.model.memory_layers == [0]
    assert cfg.train.weight_decay == 0.1 and cfg.train.precision == "auto" and cfg.wandb.mode == "offline"


def test_bases_compose_and_a_paper_recipe_is_a_few_lines(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "paper.yaml").write_text(
        "model: {vocab_size: 32000, persistent_tokens: 128, segment_len: 512, window: 2048}\n"
        "data: {seq_len: 4096}\n"
        "train: {tokens: 30000000000, global_batch_tokens: 524288, micro_batch: 1, zero_stage: 3}\n"
    )
    (tmp_path / "mac_760m.yaml").write_text(
        "base: base/paper\nmodel: {variant: mac, dim: 1536, n_layers: 24, n_heads: 16}\ntrain: {lr: 1.25e-3}\n"
    )
    cfg = resolve(["recipe=mac_760m"], recipes_dir=tmp_path)
    assert (cfg.model.variant, cfg.model.dim, cfg.model.window, cfg.data.seq_len) == ("mac", 1536, 2048, 4096)
    assert cfg.train.lr == 1.25e-3 and cfg.train.zero_stage == 3 and cfg.train.tokens == 30_000_000_000

    (tmp_path / "a.yaml").write_text("base: b\n")
    (tmp_path / "b.yaml").write_text("base: a\n")
    with pytest.raises(ConfigError, match="includes itself"):
        resolve(["recipe=a"], recipes_dir=tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.dimm=64"], "unknown config key 'model.dimm' (did you mean model.dim?)"),
        (["lr=1e-3"], "unknown config key 'lr' (did you mean train.lr?)"),
        (["model.memory.chunk=8"], "did you mean model.memory.chunk_size?"),
        (["train.steps=many"], "bad value for 'train.steps'"),
        (["nproc=1.5"], "bad value for 'nproc'"),
        (["model=3"], "'model' is a section, not a value"),
        (["train.zero_stage=4"], "train.zero_stage=4 is not allowed; choose one of 0, 1, 2, 3"),
        (["train.precision=fp16"], "choose one of auto, fp32, bf16"),
        (["parallel.sp_scheme=ring"], "choose one of relay, all_to_all"),
        (["train.steps=0", "train.tokens=0"], "set how long to train"),
        (["train.min_lr=1.0"], "train.min_lr <= train.lr"),
        (["model.n_heads=3"], "model.n_heads=3 must divide model.dim=128"),
        (["data.seq_len=1"], "data.seq_len=1 must be >= 2"),
        (["recipe=tinny"], "recipe 'tinny' not found"),
        (["steps"], "is not key=value"),
        (["resume=/no/such/checkpoint"], "no such checkpoint"),
    ],
)
def test_mistakes_name_the_key_and_the_fix(args, message):
    with pytest.raises(ConfigError) as error:
        resolve(args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_recipe_lists_close_names():
    with pytest.raises(ConfigError, match="did you mean tiny"):
        resolve(["recipe=tinyy"])
    with pytest.raises(ConfigError, match="known recipes: .*mac.*tiny"):
        resolve(["recipe=zzzz"])


def test_data_parallel_size_and_config_dicts():
    cfg = resolve(["parallel.tp=2"])
    assert data_parallel_size(cfg.parallel, 8) == 4
    with pytest.raises(ConfigError, match=r"world size 6 is not a multiple of parallel.tp \* parallel.sp = 4 \* 1"):
        data_parallel_size(resolve(["parallel.tp=4"]).parallel, 6)
    d = to_dict(cfg)
    assert to_dataclass(RunConfig, d) == cfg  # a stored config reads back as the same typed object
    assert config_diff(d, to_dict(resolve(["parallel.tp=2", "model.dim=64"]))) == ["model.dim: 128 -> 64"]


def test_cli_user_errors_are_one_line_with_exit_code_2():
    """The launcher itself, as a user runs it: one line on stderr, exit code 2, no traceback."""
    cases = {
        "model.dimm=64": "did you mean model.dim?",
        "train.micro_batch=big": "bad value for 'train.micro_batch'",
        "recipe=tinny": "did you mean tiny?",
    }
    procs = {arg: subprocess.Popen([sys.executable, "-m", "titans_scale.launch", arg], cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for arg in cases}
    for arg, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (arg, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and cases[arg] in lines[0], (arg, err)
        assert "Traceback" not in out + err
