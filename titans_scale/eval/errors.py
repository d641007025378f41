"""The error class of evaluation and generation, and the CLI wrapper that prints user errors as one line."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

USER_ERROR = 2


class EvalError(ValueError):
    """A problem the user can fix (missing checkpoint, wrong tokenizer, bad option): printed as one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad command line reported as one line (the problem and where to look) and exit 2,
    and ``--version``."""

    def __init__(self, *args, **kwargs):
        from titans_scale import version_text

        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=version_text())

    def error(self, message: str) -> NoReturn:
        raise EvalError(f"{self.prog}: {message} (see --help)")


def user_errors() -> tuple[type[BaseException], ...]:
    """The error classes that mean 'the user can fix this' across the project's parts (only those of
    modules already imported: nothing else can have raised them, and a failing command stays fast)."""
    found = [EvalError]
    for module, name in (("titans_scale.config", "ConfigError"), ("titans_scale.data.errors", "DataError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def run_cli(main: Callable[[], int | None]) -> int:
    """Run a command: a user error or Ctrl-C ends it with one line on stderr (exit 2 / 130), no traceback."""
    try:
        return main() or 0
    except Exception as err:
        if not isinstance(err, user_errors()):
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
