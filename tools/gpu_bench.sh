#!/usr/bin/env bash
# The GPU benchmark of issue 15 (tools/gpu_bench.py; docs/benchmarks.md): SD 1.5 1024, SDXL 2048
# and SDXL 4096 in fp16 with full-width random weights; baseline, published, hidiff, hidiff with
# kv_downsample 2 (and one level deeper); seconds per image and peak GPU memory, as JSON and markdown.
#
#   bash tools/gpu_bench.sh [--out DIR] [any tools/gpu_bench.py flag]
#
# On a machine without network (the lent GPU machine has torch and transformers, not diffusers),
# carry wheels: .whl/ (diffusers 0.42.x for hidiff) is installed into /tmp/hidiff-site; .whl-ref/
# (hidiffusion 0.1.10, diffusers 0.27.2 and a huggingface_hub it imports, < 0.26) into
# /tmp/hidiff-ref-site, and the published mode then runs in python3 with that folder first on its
# path. Without .whl-ref (and no --reference-python) the published rows say why they are absent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
install() {  # install() FOLDER TARGET
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl
}
extra=()
if [ -d "$root/.whl" ] && ls "$root"/.whl/*.whl >/dev/null 2>&1; then
    install "$root/.whl" /tmp/hidiff-site
    export PYTHONPATH="/tmp/hidiff-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -d "$root/.whl-ref" ] && ls "$root"/.whl-ref/*.whl >/dev/null 2>&1; then
    install "$root/.whl-ref" /tmp/hidiff-ref-site
    cat > /tmp/hidiff-ref-python <<PY
#!/bin/sh
PYTHONPATH=/tmp/hidiff-ref-site exec "$(command -v "$python")" "\$@"
PY
    chmod +x /tmp/hidiff-ref-python
    extra+=(--reference-python /tmp/hidiff-ref-python)
fi
if [ -x "$root/.venv-ref/bin/python" ] && [ ${#extra[@]} -eq 0 ]; then
    extra+=(--reference-python "$root/.venv-ref/bin/python")
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" "$root/tools/gpu_bench.py" ${extra[@]+"${extra[@]}"} "$@"
