"""Forecasting on the generated series: test MSE vs the known optimum, Titans (LMM, MAL) vs DLinear.

    python benchmarks/bench_timeseries.py [--horizons 96 336] [--models lmm mal dlinear] [--steps 600]

Every cell is one real run of the recipe ``ts_generated`` through the launcher (the engine, data-parallel
workers, checkpoints) and the ``eval forecast`` command, with ``forecast.horizon=H`` and ``model.variant``
(or ``forecast.model=dlinear``). The optimum is the noise variance in standardised units (the best any
forecaster can do, data/timeseries.py); "best linear" is the least-squares linear forecaster of the
normalised window fitted in closed form on the training windows: the bound of any DLinear-style model.
CPU minutes are the runs' own (all their processes), not wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from launched import train_and_eval

MODEL_ARGS = {"dlinear": ["forecast.model=dlinear", "train.lr=5e-3", "train.min_lr=5e-4"]}


def forecast_run(model: str, horizon: int, run_dir: Path, steps: int, nproc: int) -> dict:
    """One run of ts_generated and its test scores at its own horizon, with the CPU seconds it took."""
    variant = [] if model == "dlinear" else [f"model.variant={model}"]
    record, cpu = train_and_eval("ts_generated", [f"forecast.horizon={horizon}", f"train.steps={steps}", f"nproc={nproc}",
                                                  *variant, *MODEL_ARGS.get(model, [])],
                                 run_dir, "forecast", ["--horizons", str(horizon)])
    return {**record["results"][0], "optimum": record["optimum_mse"], "cpu": cpu}


def best_linear(horizon: int, lookback: int = 96) -> float:
    """Test MSE of the least-squares linear map (window normalised as RevIN does, plus a bias) -> horizon."""
    from titans_scale.config import resolve
    from titans_scale.tasks.forecast import ensure_generated, forecast_data

    cfg = resolve(["recipe=ts_generated", f"forecast.horizon={horizon}"])
    ensure_generated(cfg.forecast.generated)
    data = forecast_data(cfg.forecast, lookback)

    def normalised(split: str):
        windows = data.windows[split]
        x, y = (t.numpy().transpose(0, 2, 1).astype(np.float64) for t in windows.batch(np.arange(len(windows))))
        x, y = x.reshape(-1, lookback), y.reshape(-1, horizon)
        mean, std = x.mean(1, keepdims=True), x.std(1, keepdims=True) + 1e-5
        return np.hstack([(x - mean) / std, np.ones((len(x), 1))]), y, mean, std

    a, y, mean, std = normalised("train")
    weights = np.linalg.solve(a.T @ a + 1e-3 * np.eye(a.shape[1]), a.T @ ((y - mean) / std))
    a, y, mean, std = normalised("test")
    return float((((a @ weights) * std + mean - y) ** 2).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizons", type=int, nargs="+", default=[96, 336])
    parser.add_argument("--models", nargs="+", default=["lmm", "mal", "dlinear"],
                        help="model.variant values (lmm, mal, mag, mac, transformer, swa) and/or dlinear")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run (64 windows each)")
    parser.add_argument("--nproc", type=int, default=2, help="data-parallel workers per run")
    parser.add_argument("--out", default=None, help="run directories (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        results = {}
        print(f"# generated series (recipe ts_generated, lookback 96), {args.steps} steps of 64 windows, "
              f"{args.nproc} workers; test MSE (standardised)", flush=True)
        for horizon in args.horizons:
            for model in args.models:
                results[horizon, model] = forecast_run(model, horizon, root / f"{model}_h{horizon}", args.steps,
                                                         args.nproc)
                r = results[horizon, model]
                print(f"#   {model:<8} H={horizon:<4} MSE {r['mse']:.4f} MAE {r['mae']:.4f} "
                      f"({r['cpu'] / 60:.1f} CPU min)", flush=True)
    print(f"| horizon | optimum | best linear | " + " | ".join(f"{m} MSE (/ opt)" for m in args.models)
          + " | CPU min per run |")
    print("|---" * (3 + len(args.models) + 1) + "|")
    for horizon in args.horizons:
        optimum = results[horizon, args.models[0]]["optimum"]
        linear = best_linear(horizon)
        cells = [f"{results[horizon, m]['mse']:.4f} ({results[horizon, m]['mse'] / optimum:.3f})" for m in args.models]
        cpu = "/".join(f"{results[horizon, m]['cpu'] / 60:.1f}" for m in args.models)
        print(f"| {horizon} | {optimum:.4f} | {linear:.4f} ({linear / optimum:.3f}) | " + " | ".join(cells) + f" | {cpu} |")


if __name__ == "__main__":
    main()
