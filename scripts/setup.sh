#!/usr/bin/env bash
# Creates .venv in the checkout and installs titans_scale with its pinned stack (CPU torch first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.titans_scale_installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing the stack into .venv (about 2 minutes on a fresh machine)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[test,eval,hf]'
  # PyPI's torchvision (pulled in by mosaicml-streaming, used only by its vision datasets) is a CUDA build that
  # a CPU torch cannot load, and transformers imports it when present: drop it where it does not load
  .venv/bin/python -c 'import torchvision' 2>/dev/null || .venv/bin/python -m pip uninstall -q -y torchvision
  echo "$want" > "$stamp"
fi
# `lm_eval --model titans_scale` (lm-eval has no plugin discovery: a .pth start-up hook registers the class
# by name; it imports nothing of titans_scale at start-up). Rewritten every time: it follows lm_eval_plugin.py.
.venv/bin/python -m titans_scale.lm_eval_plugin >/dev/null
