"""Benchmarks that train through the real launcher and score with the real eval command, in subprocesses,
and count the CPU time those processes took (the steadier measure on a shared machine)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def children_cpu() -> float:
    """CPU seconds (user + system) of every finished child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_module(module: str, args: list[str]) -> None:
    """``python -m module args`` in the checkout; its output only if it fails (then the benchmark stops)."""
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"python -m {module} {' '.join(args[:3])} ... failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def train_and_eval(recipe: str, overrides: list[str], run_dir: Path, evaluation: str, eval_args: list[str]) -> tuple[dict, float]:
    """Train ``recipe`` with ``overrides`` into ``run_dir`` (fresh), evaluate its model.pt with
    ``python -m titans_scale.eval <evaluation>``; returns the evaluation's JSON record and the CPU seconds."""
    before = children_cpu()
    run_module("titans_scale.launch", [f"recipe={recipe}", f"run_dir={run_dir}", "resume=never", "wandb.mode=disabled",
                                       "train.checkpoint_every=0", *overrides])
    run_module("titans_scale.eval", [evaluation, "--checkpoint", str(run_dir / "model.pt"), "--out", str(run_dir / "eval"),
                                     *eval_args])
    return json.loads((run_dir / "eval" / f"{evaluation}.json").read_text()), children_cpu() - before
