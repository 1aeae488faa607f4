#!/usr/bin/env bash
# Create .venv and install vtprune with its test tools. torch is pinned: an unpinned torch (or a package
# pulling torchvision unpinned) would download a multi-GB build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]" "torch==2.14.1"
.venv/bin/python -c "import torch, transformers, vtprune; print('vtprune', vtprune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
