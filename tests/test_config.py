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
    data = ["data.data_dir=/shards", "data.tokenizer=/tokenizer.model"]  # paper recipes leave them to the user
    for name in names:
        cfg = resolve([f"recipe={name}", *data])
        assert isinstance(cfg, RunConfig) and cfg.recipe == name and cfg.run_dir == f"runs/{name}"
        parts = name.split("_")
        assert cfg.model.variant == ("mag" if name == "tiny" else parts[1] if parts[0] == "recall" else parts[0])
        assert cfg.model.vocab_size == cfg.data.vocab_size


def test_a_value_left_open_must_be_given(tmp_path):
    """Paper recipes leave the data paths to the user (``???``): a run without them says which key to add."""
    (tmp_path / "open.yaml").write_text("base: tiny\ndata:\n  data_dir: ???\n")
    for name in ("tiny", "base/cpu"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{name}.yaml").write_text((ROOT / "recipes" / f"{name}.yaml").read_text())
    with pytest.raises(ConfigError, match=r"^data.data_dir must be set: recipe .open. leaves it open \(\?\?\?\); add data.data_dir=\.\.\. to the command"):
        resolve(["recipe=open"], recipes_dir=tmp_path)
    assert resolve(["recipe=open", "data.data_dir=/shards"], recipes_dir=tmp_path).data.data_dir == "/shards"


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
