"""Forecasting (task=forecast): the CSV path (splits as the benchmarks' reference code cuts them, one-line
errors), the generated series and its optimum, the forecasters (RevIN equivariance and channel
independence in float64, DLinear's start), the in-memory loader (data-parallel partition, exact resume),
the recipes and the eval command. Training under data parallelism and its exact resume: test_beyond_language."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from titans_scale.data.errors import DataError
from titans_scale.data.samples import SampleLoader
from titans_scale.data.timeseries import GeneratedSeries, Windows, load_forecast_data, read_csv, split_rows
from titans_scale.memory import MemoryConfig
from titans_scale.models import ModelConfig
from titans_scale.models.forecast import DLinear, TitansForecaster, build_forecaster


def ts_write_csv(path, rows, channels=("a", "b"), start=0.0):
    lines = ["date," + ",".join(channels)]
    lines += [f"2020-01-01 {i:05d}," + ",".join(f"{start + i + 0.5 * c}" for c in range(len(channels))) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def ts_model_config(variant="lmm") -> ModelConfig:
    return ModelConfig(variant=variant, vocab_size=1, dim=16, n_layers=2, n_heads=2, persistent_tokens=2, window=4,
                       segment_len=4, memory=MemoryConfig(chunk_size=2, depth=2, expansion=2))


# ----------------------------------------------------------------------------------------------- CSV
def test_csv_reads_channels_and_both_paths_agree(tmp_path):
    path = ts_write_csv(tmp_path / "x.csv", 30, ("HUFL", "OT"))
    series = read_csv(path)
    assert series.names == ["HUFL", "OT"] and series.values.shape == (30, 2)
    assert series.values[7].tolist() == [7.0, 7.5]
    assert read_csv(path, ["OT"]).values[:, 0].tolist() == series.values[:, 1].tolist()
    from titans_scale.data.timeseries import _read_checked

    assert np.array_equal(_read_checked(path, ["date", "HUFL", "OT"], [1, 2]), series.values)  # the checking reader


@pytest.mark.parametrize("cell, problem", [("", "line 5, column 'b': missing value"), ("NaN", "line 5, column 'b': missing value"),
                                           ("1.2.3", "line 5, column 'b': '1.2.3' is not a number"),
                                           ("inf", "line 5, column 'b': 'inf' is not a finite number")])
def test_csv_bad_cell_is_one_line_naming_file_line_and_column(tmp_path, cell, problem):
    path = ts_write_csv(tmp_path / "bad.csv", 10)
    lines = path.read_text().splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + "," + cell
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_csv(path)
    assert str(err.value).startswith(f"CSV {path} {problem}") and "\n" not in str(err.value)


def test_csv_structural_errors(tmp_path):
    missing = tmp_path / "none.csv"
    with pytest.raises(DataError, match="does not exist; set forecast.csv"):
        read_csv(missing)
    (tmp_path / "h.csv").write_text("date\n2020,1\n")
    with pytest.raises(DataError, match="needs a header row with a date column and at least one channel"):
        read_csv(tmp_path / "h.csv")
    path = ts_write_csv(tmp_path / "ragged.csv", 5)
    path.write_text(path.read_text() + "2020-02-02,1\n")
    with pytest.raises(DataError, match=r"line 7 has 2 fields, the header 3"):
        read_csv(path)
    with pytest.raises(DataError, match=r"has no column 'OT' \(forecast.columns\); it has a, b"):
        read_csv(ts_write_csv(tmp_path / "c.csv", 5), ["OT"])


def test_splits_follow_the_reference_code(tmp_path):
    """ETT: 12/4/4 months of 30 days (x4 rows an hour for ETTm), later splits looking back into the previous
    one; others: int(0.7 n) train, int(0.2 n) test, the rest validation (Autoformer's Dataset_Custom)."""
    month = 30 * 24
    assert split_rows(17420, 96, 96, "ett_hour", tmp_path) == {
        "train": (0, 12 * month), "val": (12 * month - 96, 16 * month), "test": (16 * month - 96, 20 * month)}
    assert split_rows(69680, 336, 720, "ett_minute", tmp_path)["test"] == (64 * month - 336, 80 * month)
    n = 52696  # ECL's rows
    assert split_rows(n, 96, 96, "ratio", tmp_path) == {
        "train": (0, 36887), "val": (36887 - 96, n - 10539), "test": (n - 10539 - 96, n)}


def test_too_few_rows_is_one_line(tmp_path):
    path = ts_write_csv(tmp_path / "short.csv", 300)
    with pytest.raises(DataError) as err:
        load_forecast_data(path, 96, 96)
    assert str(err.value) == (f"CSV {path} has too few rows for a window: its val split has 30 rows (300 in all), a window "
                              f"needs the horizon 96 there; use a longer file or shorten data.seq_len / forecast.horizon")
    with pytest.raises(DataError, match=r"its train split has 70 rows \(100 in all\), a window needs lookback 48 \+ horizon 24"):
        load_forecast_data(ts_write_csv(tmp_path / "shorter.csv", 100), 48, 24)
    with pytest.raises(DataError, match="has 300 rows, but the ett_hour split needs 14400"):
        load_forecast_data(path, 8, 8, split="ett_hour")


def test_windows_are_scaled_with_training_rows_and_aligned(tmp_path):
    data = load_forecast_data(ts_write_csv(tmp_path / "x.csv", 200), 10, 5)
    train = data.windows["train"]
    assert len(train) == 140 - 15 + 1
    x, y = train.batch(np.array([0, 3]))
    assert x.shape == (2, 10, 2) and y.shape == (2, 5, 2) and x.dtype == torch.float32
    raw = np.arange(140, dtype=np.float64)
    np.testing.assert_allclose(data.scaler.mean, [raw.mean(), raw.mean() + 0.5])
    assert torch.allclose(y[1, 0, 0], torch.tensor((13 - raw.mean()) / raw.std(), dtype=torch.float32))
    test = data.windows["test"]  # its first target row is the first test row (200 - 40 = 160)
    assert torch.allclose(test.batch(np.array([0]))[1][0, 0, 0], torch.tensor((160 - raw.mean()) / raw.std(), dtype=torch.float32))


# ------------------------------------------------------------------------------------ generated series
def test_generated_series_optimum_is_the_noise_of_the_clean_forecast(tmp_path):
    """Forecasting the noise-free series scores the stated optimum (noise variance / training variance), up
    to the sampling error of the realised noise: 4 standard deviations of a mean of n squared normals."""
    g = GeneratedSeries(rows=3000, channels=3, noise=0.7, seed=3)
    path = g.write(tmp_path / "gen.csv")
    data = load_forecast_data(path, 48, 24)
    clean = Windows(data.scaler(g.clean())[3000 - 600 - 48:], 48, 24)  # the test rows of the clean series
    x, y = data.windows["test"].batch(np.arange(len(data.windows["test"])))
    _, y_clean = clean.batch(np.arange(len(clean)))
    mse = ((y - y_clean) ** 2).double().mean().item()
    optimum = g.optimum_mse(data.scaler)
    assert abs(mse / optimum - 1) < 4 * math.sqrt(2 / (600 * 3)), (mse, optimum)
    assert read_csv(path).values.shape == (3000, 3)


# ---------------------------------------------------------------------------------------- forecasters
@pytest.mark.parametrize("kind", ["titans", "dlinear"])
def test_revin_forecast_is_equivariant_to_scale_and_shift(kind):
    """With RevIN, forecasting a * x + b gives a * forecast(x) + b, per channel (float64, rounding only)."""
    torch.manual_seed(0)
    model = build_forecaster(ts_model_config(), kind=kind, lookback=16, horizon=6, patch_len=4, revin=True,
                             moving_average=5).double()
    model.revin_eps = 0.0  # (it only keeps constant windows finite; with it the map is equivariant up to eps / var)
    x = torch.randn(3, 16, 2, dtype=torch.float64)
    a, b = torch.tensor([2.5, 0.3], dtype=torch.float64), torch.tensor([-4.0, 10.0], dtype=torch.float64)
    with torch.no_grad():
        y, y_moved = model(x), model(x * a + b)
    assert y.shape == (3, 6, 2)
    assert torch.allclose(y_moved, y * a + b, rtol=0, atol=1e-12 * 10)


def test_titans_forecaster_is_channel_independent_and_per_step_works():
    torch.manual_seed(0)
    for patch_len in (4, 1):
        model = TitansForecaster(ts_model_config("mal"), 16, 6, patch_len).double()
        x = torch.randn(2, 16, 3, dtype=torch.float64)
        with torch.no_grad():
            y = model(x)
            # the same series give the same forecasts in any company (float64: up to a batch size's rounding)
            assert torch.allclose(model(x[:, :, [2, 0, 1]]), y[:, :, [2, 0, 1]], rtol=0, atol=1e-12)
            assert torch.allclose(model(x[:, :, 1:2]), y[:, :, 1:2], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"data.seq_len=18 \(the lookback window\) must be a multiple of forecast.patch_len=4"):
        TitansForecaster(ts_model_config(), 18, 6, 4)


def test_dlinear_starts_at_the_window_mean():
    model = DLinear(12, 5, kernel=5, normalise=False)
    x = torch.randn(2, 12, 3)
    assert torch.allclose(model(x), x.mean(1, keepdim=True).expand(2, 5, 3), atol=1e-6)


# ------------------------------------------------------------------------------------------- loader
class _Numbers:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def batch(self, indices):
        return torch.as_tensor(np.asarray(indices))


def ts_take(loader, n: int) -> list:
    """The next n batches of a loader, across epochs, as the engine draws them."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def test_sample_loader_partitions_over_ranks_and_resumes_exactly():
    def loader(rank, dp=2):
        return SampleLoader(_Numbers(23), micro_batch=3, dp_rank=rank, dp_size=dp, shuffle=True, seed=5)

    a, b = loader(0), loader(1)
    assert len(a) == 23 // 6 == len(list(b))
    seen = torch.cat([torch.cat(pair) for pair in zip(a, loader(1))])
    assert len(set(seen.tolist())) == 18  # disjoint, one global batch after another, the tail of 5 dropped
    straight = ts_take(loader(0), 9)  # over two epoch boundaries
    for stop in (2, 3, 5):  # mid-epoch, right after an epoch's last batch, in the second epoch
        first = loader(0)
        taken = ts_take(first, stop)
        resumed = loader(0)
        resumed.load_state_dict(first.state_dict())
        assert all(torch.equal(x, y) for x, y in zip(taken + ts_take(resumed, 9 - stop), straight))
    with pytest.raises(DataError, match="global batch"):
        loader(0, dp=1).load_state_dict(loader(0).state_dict())
    with pytest.raises(DataError, match="the train split has 23 samples, fewer than one global batch"):
        SampleLoader(_Numbers(23), micro_batch=12, dp_rank=0, dp_size=2, shuffle=False, seed=0, name="train split")


# ------------------------------------------------------------------------------- recipes and commands
def test_forecast_recipes_resolve(tmp_path):
    from titans_scale.config import ConfigError, resolve

    cfg = resolve(["recipe=ts_generated", "forecast.horizon=336"])
    assert cfg.task == "forecast" and cfg.run_dir == "runs/ts_generated_h336" and cfg.data.seq_len == 96
    for name in ("ts_ettm1", "ts_ettm2", "ts_etth1", "ts_etth2", "ts_weather", "ts_ecl", "ts_traffic"):
        with pytest.raises(ConfigError, match="forecast.csv must be set"):
            resolve([f"recipe={name}"])
        assert resolve([f"recipe={name}", "forecast.csv=x.csv"]).forecast.split in ("ett_hour", "ett_minute", "ratio")
    with pytest.raises(ConfigError, match="forecast.model='linear' is unknown; choose one of titans, dlinear"):
        resolve(["recipe=ts_generated", "forecast.model=linear"])


def test_launch_refuses_bad_csv_in_one_line(tmp_path, capsys):
    from titans_scale.launch import main

    path = ts_write_csv(tmp_path / "short.csv", 150)
    code = main(["recipe=ts_etth1", f"forecast.csv={path}", "forecast.split=ratio", "dry_run=true", f"run_dir={tmp_path}/r"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: CSV {path} has too few rows for a window")
