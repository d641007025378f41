"""Training curves of a run: ``python -m titans_scale.eval curves RUN_DIR``.

Reads ``<run_dir>/metrics.jsonl`` and draws the training loss (each step, and its moving average) and the
validation loss by optimizer step, beside the same as perplexity (log scale), into ``curves.png`` beside
it. A finished run draws it by itself; this command redraws it at any time, also while a run goes on.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .errors import ArgumentParser, EvalError, run_cli

METRICS, PNG = "metrics.jsonl", "curves.png"


def read_metrics(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) and (step, validation loss) pairs of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise EvalError(f"no {METRICS} in {run_dir}; pass a run directory (run_dir of a run that has taken a step)")
    train, val = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise EvalError(f"{path} line {number} is not JSON; the file was edited or cut") from None
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        if "val_loss" in row:
            val.append((row["step"], row["val_loss"]))
    if not train and not val:
        raise EvalError(f"{path} holds no loss yet; draw the curves once the run has taken a step")
    return train, val


def moving_average(values: list[float], span: int) -> list[float]:
    """Exponential moving average with the weight of a ``span``-step window, started at the first value."""
    alpha, out, avg = 2.0 / (span + 1), [], None
    for v in values:
        avg = v if avg is None else avg + alpha * (v - avg)
        out.append(avg)
    return out


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the loss and perplexity curves of a run; returns the PNG (default ``<run_dir>/curves.png``)."""
    from .results import new_figure, save_figure

    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir)
    fig, (loss_ax, ppl_ax) = new_figure(11, 4, ncols=2)
    span = max(1, len(train) // 20)
    for ax, scale in ((loss_ax, lambda x: x), (ppl_ax, lambda x: math.exp(min(x, 50.0)))):
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, [scale(v) for v in losses], color="tab:blue", alpha=0.3, linewidth=0.8, label="train")
            if span > 1:
                ax.plot(steps, [scale(v) for v in moving_average(list(losses), span)], color="tab:blue",
                        label=f"train (moving average, {span} steps)")
        if val:
            steps, losses = zip(*val)
            ax.plot(steps, [scale(v) for v in losses], color="tab:orange", marker="o", label="validation")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    loss_ax.set_ylabel("loss (nats per token)")
    ppl_ax.set_ylabel("perplexity")
    ppl_ax.set_yscale("log")
    loss_ax.legend(fontsize=8)
    last = f"; validation {val[-1][1]:.4f} (ppl {math.exp(min(val[-1][1], 50.0)):.2f}) at step {val[-1][0]}" if val else ""
    fig.suptitle(f"{run_dir.name}{last}", fontsize=10)
    return save_figure(fig, Path(out) if out else run_dir / PNG)


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        parser = ArgumentParser(prog="python -m titans_scale.eval curves", description=__doc__.splitlines()[0])
        parser.add_argument("run_dir", help="a run's directory (holding metrics.jsonl)")
        parser.add_argument("--out", default=None, help=f"the PNG to write (default: RUN_DIR/{PNG})")
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        print(f"wrote {plot_curves(args.run_dir, args.out)}")
        return 0

    return run_cli(run)
