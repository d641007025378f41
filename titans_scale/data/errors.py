"""The one error class of the data path, and the CLI wrapper that prints it as one line."""

from __future__ import annotations

import sys
from typing import Callable


class DataError(ValueError):
    """A problem the user can fix (bad corpus file, mismatched tokenizer, corrupt shard): one line."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a data command: a DataError or Ctrl-C ends it with one line on stderr and exit code 2."""
    try:
        main()
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written was left under the output name", file=sys.stderr)
        raise SystemExit(2) from None
