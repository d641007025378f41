"""MSE and MAE of a forecasting model (``task=forecast``) per horizon, on the test split of its CSV.

Errors are on standardised values (each channel scaled by the training rows' mean and std), averaged over
every test window, channel and forecast step, as the long-term forecasting benchmarks report them. A model
forecasts ``forecast.horizon`` steps; a shorter horizon is scored on its first steps (the benchmarks train
one model per horizon: evaluate each run for its own row). On the generated series the best possible MSE
(the noise variance, standardised) is printed beside it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from .errors import EvalError

LANGUAGE_MODEL = False  # no tokenizer, no reading window


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", default=None, help="CSV to evaluate (default: the one the model was trained on)")
    parser.add_argument("--split", default="test", choices=["val", "test"], help="which split's windows (default test)")
    parser.add_argument("--horizons", default=None,
                        help="comma-separated horizons to report, each <= the model's (default: those of 96, 192, "
                             "336, 720 up to the model's horizon, and its own)")
    parser.add_argument("--batch-size", type=int, default=256, help="windows per forward pass")


@torch.no_grad()
def step_errors(model, windows, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Squared and absolute error per forecast step, each the mean over windows and channels, float64."""
    horizon = windows.horizon
    squared, absolute, count = np.zeros(horizon), np.zeros(horizon), 0
    for first in range(0, len(windows), batch_size):
        x, y = windows.batch(np.arange(first, min(len(windows), first + batch_size)))
        diff = (model(x.to(device)).double().cpu() - y.double())
        squared += (diff**2).sum((0, 2)).numpy()
        absolute += diff.abs().sum((0, 2)).numpy()
        count += diff.shape[0] * diff.shape[2]
    return squared / count, absolute / count


def horizons_of(text: str | None, horizon: int) -> list[int]:
    from titans_scale.tasks.config import HORIZONS

    from .cli import parse_int_list

    if text is None:
        return sorted({h for h in HORIZONS if h <= horizon} | {horizon})
    chosen = parse_int_list(text, "--horizons")
    too_long = [h for h in chosen if not 1 <= h <= horizon]
    if too_long:
        raise EvalError(f"--horizons {text}: {too_long[0]} is not in [1, {horizon}], the steps the model forecasts")
    return sorted(set(chosen))


def run(args: argparse.Namespace) -> dict:
    from titans_scale.config import to_dataclass
    from titans_scale.data.timeseries import generated_series_of
    from titans_scale.tasks.config import ForecastConfig
    from titans_scale.tasks.forecast import csv_path, forecast_data

    from .checkpoint import load_checkpoint, model_path, model_task, resolve_device
    from .results import format_table, log_to_wandb, output_dir, write_json

    path = model_path(args.checkpoint)
    _, task_config = model_task(path, expected="forecast")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size {args.batch_size} must be >= 1")
    lookback = task_config["lookback"]
    f = to_dataclass(ForecastConfig, {k: v for k, v in task_config.items() if k != "lookback"}, prefix="forecast.")
    if args.csv:
        f.csv = args.csv
    horizons = horizons_of(args.horizons, f.horizon)
    device = resolve_device(args.device)
    model, _ = load_checkpoint(path, device, args.dtype)
    data = forecast_data(f, lookback)
    windows = data.windows[args.split]
    started = time.perf_counter()
    squared, absolute = step_errors(model, windows, args.batch_size, device)
    rows = [{"horizon": h, "mse": float(squared[:h].mean()), "mae": float(absolute[:h].mean())} for h in horizons]
    generated = generated_series_of(csv_path(f))
    optimum = generated.optimum_mse(data.scaler) if generated is not None else None
    columns = ["MSE", "MAE"] + (["MSE / optimum"] if optimum else [])
    cells = [[f"{r['mse']:.4f}", f"{r['mae']:.4f}"] + ([f"{r['mse'] / optimum:.3f}"] if optimum else []) for r in rows]
    print(f"{path}: {f.model if f.model == 'dlinear' else 'titans'} forecaster trained for horizon {f.horizon}, "
          f"lookback {lookback} | {csv_path(f)} ({data.split} split), {args.split}: {len(windows)} windows x "
          f"{len(data.names)} channels" + (f" | optimum MSE {optimum:.4f} (the noise variance)" if optimum else ""))
    print(format_table("horizon", [str(r["horizon"]) for r in rows], columns, cells))
    record = {"task": "forecast", "checkpoint": str(path), "csv": str(csv_path(f)), "split": args.split,
              "trained_horizon": f.horizon, "lookback": lookback, "windows": len(windows), "channels": data.names,
              "optimum_mse": optimum, "results": rows, "seconds": round(time.perf_counter() - started, 3)}
    out = output_dir(args.out, path)
    print(f"wrote {write_json(out / 'forecast.json', record)}")
    log_to_wandb(args.wandb, out, "forecast", {f"mse_{r['horizon']}": r["mse"] for r in rows}, config=record,
                 model_file=path, project=args.wandb_project)
    return record
