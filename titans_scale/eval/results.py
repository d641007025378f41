"""What every evaluation leaves behind: a JSON result file, a table on stdout, a heat-map PNG where a picture
helps, and (when enabled) the same numbers in wandb, offline by default with its files in the output dir."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

WANDB_MODES = ("off", "offline", "online")


def output_dir(out: str | None, model_file: Path) -> Path:
    """Where results go: ``--out``, else ``eval/`` beside the model file (the run directory)."""
    path = Path(out) if out else model_file.parent / "eval"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, data: dict) -> Path:
    """Write ``data`` as indented JSON, atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def format_table(corner: str, rows: Sequence[str], columns: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A plain-text table with aligned columns (markdown pipes, so it pastes into a README)."""
    header = [corner, *columns]
    body = [[row, *cell_row] for row, cell_row in zip(rows, cells)]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(items):
        return "| " + " | ".join(item.rjust(w) if i else item.ljust(w) for i, (item, w) in enumerate(zip(items, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *map(line, body)])


def percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def accuracy_heatmap(path: Path, cells: Sequence[Sequence[float | None]], rows: Sequence[str], columns: Sequence[str],
                     *, title: str, xlabel: str, ylabel: str) -> Path:
    """Accuracy (0..1) as a red-to-green grid with the percentage in every cell, written atomically."""
    import numpy as np

    grid = np.array([[np.nan if v is None else v for v in row] for row in cells], dtype=float)
    fig, ax = new_figure(1.2 + 0.9 * max(2, len(columns)), 1.2 + 0.5 * max(2, len(rows)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(columns)), labels=list(columns))
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for i in range(len(rows)):
        for j in range(len(columns)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    return save_figure(fig, path)


def new_figure(width: float, height: float, ncols: int = 1):
    """A matplotlib figure and its axes (``ncols`` side by side: a tuple) drawn by the Agg backend (no display,
    no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, (fig.add_subplot() if ncols == 1 else tuple(fig.subplots(1, ncols)))


def save_figure(fig, path: Path) -> Path:
    """Write a figure as PNG, atomically."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)
    return path


def log_to_wandb(mode: str, out_dir: Path, task: str, metrics: dict, *, config: dict, model_file: Path,
                 images: dict[str, Path] | None = None, project: str | None = None) -> None:
    """The summary numbers (and pictures) of one evaluation in a wandb run named after the model's run, whose
    files live in ``out_dir/wandb`` (one run per output directory: evaluations of a checkpoint land together)."""
    if mode == "off":
        return
    from titans_scale.config import WandbConfig
    from titans_scale.train.metrics import start_wandb

    run = start_wandb(WandbConfig(project=project, mode=mode, name=f"eval-{model_file.parent.name}"), out_dir, config)
    try:
        import wandb

        flat = {f"{task}/{key}": value for key, value in metrics.items()}
        flat.update({f"{task}/{name}": wandb.Image(str(path)) for name, path in (images or {}).items()})
        run.log(flat)
        run.summary.update({k: v for k, v in flat.items() if isinstance(v, (int, float))})
    finally:
        run.finish()
