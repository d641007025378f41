#!/usr/bin/env bash
# The README's first command: set up .venv, then run the main job end to end on this CPU with the tiny recipe:
# bundled sample corpus -> tokenizer -> shards -> training with progress -> validation perplexity -> a sample.
# Extra key=value arguments are passed on (e.g. train.steps=50, nproc=2, run_dir=runs/mine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m titans_scale.launch recipe=tiny "$@"
