#!/usr/bin/env bash
# Rewrites constraints.txt from the working .venv so that every fresh machine gets the same versions.
set -euo pipefail
cd "$(dirname "$0")/.."
{ echo "# Pinned set that installs together on CPU machines (pip freeze of a working .venv)."
  echo "# torch stays the local CPU build; regenerate with scripts/freeze.sh after changing dependencies."
  .venv/bin/python -m pip freeze --exclude-editable | grep -v '^titans' | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'
} > constraints.txt
