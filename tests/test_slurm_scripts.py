"""The sbatch scripts in slurm/, read without Slurm: one per paper recipe, each a thin #SBATCH header over
the shared slurm/_launch.sh, with what a requeue-safe job needs (pre-timeout signal to the batch shell,
--requeue, appended per-job logs), a world size that splits its recipe's batch, and valid bash."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SLURM_DIR = ROOT / "slurm"
SCRIPTS = sorted(p.name for p in SLURM_DIR.glob("*.sh") if not p.name.startswith("_"))
SOURCE_LINE = 'source "${TITANS_SCALE_HOME:-$SLURM_SUBMIT_DIR}/slurm/_launch.sh" "$@"'


def sbatch_header(path: Path) -> dict[str, str]:
    """The #SBATCH options of a script (sbatch reads them up to the first line that is not a comment)."""
    options = {}
    for line in path.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            options[m[1]] = m[2] if m[2] is not None else ""
    return options


def test_every_paper_recipe_has_a_script_and_every_script_a_recipe():
    from test_recipes import PAPER, RECIPES

    assert {f"{name}.sh" for name in RECIPES if PAPER.fullmatch(name)} <= set(SCRIPTS)
    for script in SCRIPTS:
        recipe = re.search(r"^RECIPE=(\S+)$", (SLURM_DIR / script).read_text(), flags=re.M)[1]
        assert recipe in RECIPES, script


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_a_requeue_safe_header_over_the_shared_body(script):
    path = SLURM_DIR / script
    text = path.read_text()
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    header = sbatch_header(path)
    lead = int(re.fullmatch(r"B:USR1@(\d+)", header["signal"])[1])
    assert 60 <= lead, "the ranks need time to finish a step and save before the time limit"
    assert header["requeue"] == "" and header["open-mode"] == "append"
    assert header["output"] == header["error"] == "%x-%j.out"
    assert header["job-name"] == path.stem and re.fullmatch(r"(\d+-)?\d+:\d\d:\d\d", header["time"])
    assert text.rstrip().endswith(f"RECIPE={path.stem if path.stem != 'tiny_cpu' else 'tiny'}\n{SOURCE_LINE}")
    if script != "tiny_cpu.sh":
        assert header["gpus-per-node"] == header["ntasks-per-node"] == "8"  # one task per GPU


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_world_splits_its_recipe_batch(script, tmp_path):
    from test_recipes import PAPER, PAPER_DATA

    from titans_scale.config import resolve
    from titans_scale.train.engine import make_plan

    recipe = re.search(r"^RECIPE=(\S+)$", (SLURM_DIR / script).read_text(), flags=re.M)[1]
    header = sbatch_header(SLURM_DIR / script)
    cfg = resolve([f"recipe={recipe}", f"run_dir={tmp_path}", *(PAPER_DATA if PAPER.fullmatch(recipe) else [])])
    make_plan(cfg, int(header["nodes"]) * int(header["ntasks-per-node"]))  # a ConfigError if it does not split


def test_shared_body_passes_overrides_after_its_defaults():
    """The user's key=value arguments come last, so they win over the body's run_dir (OmegaConf keeps the last)."""
    body = (SLURM_DIR / "_launch.sh").read_text()
    assert '-m titans_scale.launch "recipe=$RECIPE" "run_dir=$RUN_DIR" "$@" &' in body
    from titans_scale.config import resolve

    assert resolve(["recipe=tiny", "run_dir=runs/tiny_cpu-7", "run_dir=/mine"]).run_dir == "/mine"
