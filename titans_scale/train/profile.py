"""``train.profile=true``: a torch profiler trace of a few training steps, for Perfetto or chrome://tracing.

Each rank traces ``ACTIVE`` optimizer steps after ``SKIPPED`` untraced ones (the first steps pay for
allocations and warm-up), and writes ``<run_dir>/profile/trace_rank<R>.json`` plus the operators that took
the most time (``ops_rank<R>.txt``). A run shorter than that traces what it has.
"""

from __future__ import annotations

from pathlib import Path

import torch

SKIPPED, ACTIVE = 2, 3


class StepProfiler:
    """Call ``step()`` after every optimizer step and ``close()`` at the end; writes once its steps are done."""

    def __init__(self, run_dir: Path, rank: int, steps_left: int, device: torch.device, first_step: int):
        from torch.profiler import ProfilerActivity, profile, schedule

        skip = min(SKIPPED, max(0, steps_left - 1))
        active = max(1, min(ACTIVE, steps_left - skip))
        self.steps = (first_step + skip + 1, first_step + skip + active)  # 1-based optimizer steps traced
        self.dir, self.rank, self.written = Path(run_dir) / "profile", rank, None
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.profiler = profile(activities=activities, record_shapes=True, profile_memory=True,
                                schedule=schedule(wait=max(0, skip - 1), warmup=min(1, skip), active=active, repeat=1),
                                on_trace_ready=self._write)
        self.profiler.start()

    def _write(self, profiler) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"trace_rank{self.rank}.json"
        profiler.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if any(e.device_type.name == "CUDA" for e in profiler.events()) else "self_cpu_time_total"
        (self.dir / f"ops_rank{self.rank}.txt").write_text(profiler.key_averages().table(sort_by=sort, row_limit=30) + "\n")
        self.written = trace

    def step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def close(self) -> Path | None:
        """Stop profiling; the trace written (None when the run ended before its traced steps)."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
        return self.written


class NoProfiler:
    """What the engine holds when ``train.profile`` is off."""

    written = None

    def step(self) -> None:
        pass

    def close(self) -> None:
        return None


def step_profiler(enabled: bool, run_dir: Path, rank: int, steps_left: int, device: torch.device, first_step: int):
    return StepProfiler(run_dir, rank, steps_left, device, first_step) if enabled and steps_left > 0 else NoProfiler()
