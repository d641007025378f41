"""A rate-limited progress line for long data work (reading, tokenizing, writing shards)."""

from __future__ import annotations

import sys
import time


def human(n: float) -> str:
    """1234567 -> '1.23M': short counts for progress lines."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


class Progress:
    """Prints `label: text` to stderr at most every `interval` seconds: in place on a terminal,
    one line at a time otherwise (logs of batch jobs)."""

    def __init__(self, label: str, enabled: bool = True, interval: float | None = None):
        self.label = label
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 5.0)
        self.start = time.perf_counter()
        self._last = -float("inf")
        self._dirty = False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < self.interval):
            return
        self._last = now
        if self.tty:
            sys.stderr.write(f"\r\033[K{self.label}: {text}")
            self._dirty = True
        else:
            sys.stderr.write(f"{self.label}: {text}\n")
        sys.stderr.flush()

    def done(self, text: str) -> None:
        """The closing line, always printed (when enabled) on a line of its own."""
        if not self.enabled:
            return
        if self._dirty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(f"{self.label}: {text}\n")
        sys.stderr.flush()
        self._dirty = False
