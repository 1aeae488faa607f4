#!/usr/bin/env bash
# Create .venv-llava: the original LLaVA codebase (haotian-liu/LLaVA) on its transformers 4.37 pin, with
# vtprune installed from this checkout, to run the test suite against transformers 4.x.
#
# The registry packaging of the LLaVA repository, llava-torch 1.2.2.post1, pins torch 2.0.1, transformers
# 4.36.2 and gradio 4.16 (none installable beside this machine's torch), so it goes in with --no-deps and
# its model code's real needs are pinned here by hand: transformers 4.37.2 (the repository's own pin on
# GitHub) with tokenizers 0.15, numpy < 2 (transformers 4.37 predates numpy 2), pillow (llava.mm_utils),
# accelerate (load_pretrained_model passes a device_map) and sentencepiece (real checkpoints ship
# LLaMA's slow tokenizer). torch 2.13.0 is the CPU wheel on local disk: always pinned, never downloaded.
# FlowCut's own package, flowcut 1.0.2 (the reference of benchmarks/parity/flowcut.py and
# tests/test_flowcut_package.py), declares no dependencies; it patches transformers 4.37's CLIP and LLaMA
# classes and the repository's llava classes, so it needs exactly what is pinned here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-llava}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "torch==2.13.0" "transformers==4.37.2" "tokenizers==0.15.1" "numpy<2" \
  "accelerate==0.26.1" "sentencepiece" "pillow" "pytest>=8"
"$VENV/bin/python" -m pip install -q --no-deps "llava-torch==1.2.2.post1"
"$VENV/bin/python" -m pip install -q "flowcut==1.0.2"
"$VENV/bin/python" -m pip install -q -e . "torch==2.13.0" "transformers==4.37.2" "tokenizers==0.15.1" "numpy<2"
"$VENV/bin/python" -c "import torch, transformers, vtprune; from vtprune.toy.tiny_llava_repo import llava_repo_available; assert llava_repo_available(), 'llava does not import'; import flowcut; print('vtprune', vtprune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| llava-torch 1.2.2.post1 | flowcut 1.0.2')"
