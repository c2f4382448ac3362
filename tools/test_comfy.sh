#!/usr/bin/env bash
# Run hidiff's ComfyUI tests (tests/comfy) against any ComfyUI installation.
#
#   HIDIFF_COMFY_ROOT=/path/to/ComfyUI HIDIFF_COMFY_PYTHON=/path/to/ComfyUI/venv/bin/python \
#       bash tools/test_comfy.sh [pytest arguments, e.g. -x -q -k compose, or test files: tests/comfy/test_pack.py]
#
# Defaults: .comfy/ComfyUI and .comfy/bin/python (what tools/install_comfy.sh makes; CI's ComfyUI 0.3.75).
# The tests run in ComfyUI's own Python (so they use its torch and ComfyUI's dependencies) with this
# checkout first on the path; nothing is installed into that environment. They need pytest there
# (the script stops and says how to add it); the cross-host tests also need diffusers and are
# skipped without it. The real-server tests start that ComfyUI's main.py on a free local port with
# a temporary base directory (custom_nodes = this repository + a test kit); the browser test needs
# a chromium binary. A ComfyUI too old for the node's APIs runs the feature-detection tests only.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMFY_ROOT=${HIDIFF_COMFY_ROOT:-${HIDIFF_COMFYUI:-$ROOT/.comfy/ComfyUI}}
PY=${HIDIFF_COMFY_PYTHON:-$ROOT/.comfy/bin/python}

if [ ! -f "$COMFY_ROOT/comfy/model_patcher.py" ]; then
  echo "test_comfy.sh: $COMFY_ROOT is not a ComfyUI root (no comfy/model_patcher.py); set HIDIFF_COMFY_ROOT" >&2
  exit 2
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "test_comfy.sh: $PY cannot import torch; set HIDIFF_COMFY_PYTHON to the Python that runs this ComfyUI" >&2
  exit 2
fi
if ! "$PY" -c "import pytest" 2>/dev/null; then
  echo "test_comfy.sh: no pytest in $PY; add it with: $PY -m pip install pytest" >&2
  exit 2
fi
VERSION=$(cd "$COMFY_ROOT" && "$PY" -c "import comfyui_version; print(comfyui_version.__version__)" 2>/dev/null || echo unknown)
echo "test_comfy.sh: ComfyUI $VERSION at $COMFY_ROOT, Python $PY"
cd "$ROOT"
export HIDIFF_COMFY_ROOT="$COMFY_ROOT" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# The whole folder unless the arguments name test files or folders themselves.
TARGET=tests/comfy
for arg in "$@"; do
  case "$arg" in tests/*) TARGET= ;; esac
done
# --confcutdir: tests/conftest.py (the diffusers tests' fixtures) is not needed here and imports the diffusers host
exec "$PY" -m pytest $TARGET -p no:cacheprovider --confcutdir=tests/comfy "$@"
