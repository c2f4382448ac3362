#!/usr/bin/env bash
# Install a real, CPU-only InvokeAI 6.14.2 into .invokeai/ at the repository root, from the
# package registry only, for hidiff's InvokeAI tests (tests/invokeai) and for trying the node pack.
#
#   bash tools/install_invokeai.sh
#
# Result: .invokeai/ is a virtual environment with invokeai-web (.invokeai/bin/invokeai-web),
# pytest, and this repository's hidiff installed editable without dependencies (the node pack
# imports it). The InvokeAI roots the tests use are temporary folders; nothing is written here
# but the venv. Idempotent: a re-run checks what is there and installs only what is missing.
#
# Environment: PYTHON (default python3.11), INVOKEAI_DIR (default .invokeai),
# TORCH_SPEC (default torch==2.13.0+cpu), TORCHVISION_SPEC (default torchvision==0.28.0),
# INVOKEAI_SPEC (default invokeai==6.14.2), INVOKEAI_NO_LOCK=1 (do not hold the other
# dependencies to tools/invokeai-lock.txt).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
  *) echo "usage: $0" >&2; exit 2 ;;
esac
DIR=${INVOKEAI_DIR:-$ROOT/.invokeai}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}
TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.28.0}
INVOKEAI_SPEC=${INVOKEAI_SPEC:-invokeai==6.14.2}
LOCK=$ROOT/tools/invokeai-lock.txt
START=$(date +%s)

say() { echo "[install_invokeai $(date +%H:%M:%S)] $*"; }
pip_() {  # pip, without the one warning per package about this machine's local index folders
  "$DIR/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
  return "${PIPESTATUS[0]}"
}

# 1. the virtual environment
if [ ! -x "$DIR/bin/python" ]; then
  say "venv $DIR ($PY)"
  "$PY" -m venv "$DIR"
fi

# 2. InvokeAI with CPU torch (never a CUDA build), pytest for the tests.
if ! "$DIR/bin/python" - "$INVOKEAI_SPEC" "$TORCH_SPEC" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
import torch
want_invokeai, want_torch = (s.split("==")[1] for s in sys.argv[1:3])
sys.exit(torch.version.cuda is not None or version("invokeai") != want_invokeai
         or torch.__version__ != want_torch or not version("pytest"))
PYEOF
then
  LOCKARGS=()
  if [ -z "${INVOKEAI_NO_LOCK:-}" ]; then LOCKARGS=(-c "$LOCK"); fi
  say "installing $INVOKEAI_SPEC $TORCH_SPEC $TORCHVISION_SPEC pytest"
  pip_ install -q "${LOCKARGS[@]}" "$TORCH_SPEC" "$TORCHVISION_SPEC" "$INVOKEAI_SPEC" pytest
fi

# The registry's torchvision is a CUDA build; let it import beside CPU torch.
"$DIR/bin/python" "$ROOT/tools/guard_torchvision.py"

# 3. this repository's hidiff, editable and without dependencies (InvokeAI brings torch and
#    diffusers; the node pack and the tests import hidiff from here).
if ! (cd / && "$DIR/bin/python" -c 'import hidiff.core.config, os, sys; sys.exit(os.path.dirname(os.path.dirname(hidiff.core.config.__file__)) != sys.argv[1] + "/hidiff")' "$ROOT") 2>/dev/null; then
  say "installing hidiff (editable, no dependencies) from $ROOT"
  pip_ install -q --no-deps --no-build-isolation -e "$ROOT"
fi

# 4. InvokeAI's denoise node and hidiff's diffusers host import on CPU
(cd / && "$DIR/bin/python" -c '
import torch, diffusers
import invokeai.version, invokeai.app.invocations.denoise_latents
import hidiff.diffusers
assert torch.version.cuda is None, torch.__version__
print("InvokeAI", invokeai.version.__version__, "torch", torch.__version__, "diffusers", diffusers.__version__, "imports on CPU")')
say "done in $(( $(date +%s) - START )) s: $DIR (invokeai-web $DIR/bin/invokeai-web)"
