#!/usr/bin/env bash
# Create .venv and install vtprune with its test tools. torch is pinned: an unpinned torch (or a package
# pulling torchvision unpinned) would download a multi-GB build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]" "torch==2.14.1" "torchvision==0.29.1"
# the original LLaVA codebase (its adapter is also tested on transformers 5): its registry packaging pins
# torch 2.0.1 / transformers 4.36, so only its code goes in; scripts/setup_llava_repo.sh builds the 4.37 env
.venv/bin/python -m pip install -q --no-deps "llava-torch==1.2.2.post1"
.venv/bin/python -c "import torch, transformers, vtprune; print('vtprune', vtprune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
