#!/usr/bin/env bash
# Run the test suite (less the exactness test, which compares against .venv-ref and
# does not depend on the host diffusers) on each older diffusers release hidiff
# supports, each in its own environment .venv-matrix/<version> with the transformers,
# huggingface_hub, peft and numpy of its time. The current release is what .venv tests.
#
#   bash tools/matrix.sh                 # every version below
#   bash tools/matrix.sh 0.30.3          # only these
#
# Idempotent: an existing environment is reused and only brought to its pins.
# Exits non-zero if any version fails (after running all of them).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${HIDIFF_TORCH:-torch==2.13.0}
PIP_FLAGS=(-q --disable-pip-version-check)

# Pins that go with each diffusers release (the newest of their line that it works with).
pins() {
    case "$1" in
        0.27.2) echo "transformers==4.44.2 huggingface_hub==0.25.2 peft==0.12.0 numpy<2" ;;
        0.30.3) echo "transformers==4.45.2 huggingface_hub==0.25.2 peft==0.13.2 numpy<2" ;;
        0.35.2) echo "transformers==4.57.6 huggingface_hub==0.36.2 peft==0.17.1 numpy" ;;
        *) echo "unknown diffusers version $1 (add its pins to tools/matrix.sh)" >&2; return 1 ;;
    esac
}

VERSIONS=("$@")
if [ ${#VERSIONS[@]} -eq 0 ]; then VERSIONS=(0.27.2 0.30.3 0.35.2); fi

failed=()
for v in "${VERSIONS[@]}"; do
    echo "=== diffusers $v ==="
    start=$SECONDS
    venv=.venv-matrix/$v
    if ! extra=$(pins "$v"); then failed+=("$v"); continue; fi
    # shellcheck disable=SC2086  # the pins are separate words
    if ! { { [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"; } \
        && "$venv/bin/pip" install "${PIP_FLAGS[@]}" "$TORCH" \
        && "$venv/bin/pip" install "${PIP_FLAGS[@]}" -e ".[test]" "diffusers==$v" $extra; }; then
        echo "diffusers $v: environment setup failed"
        failed+=("$v")
        continue
    fi
    "$venv/bin/python" -c 'import diffusers, transformers, huggingface_hub, peft, torch, numpy
print("diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "huggingface_hub", huggingface_hub.__version__, "peft", peft.__version__,
      "torch", torch.__version__, "numpy", numpy.__version__)'
    # the published package and ComfyUI have their own environments, tested on the current release
    if ! HIDIFF_CI= "$venv/bin/python" -m pytest -q -m "not reference and not comfy" -p no:cacheprovider; then
        failed+=("$v")
    fi
    echo "diffusers $v: $((SECONDS - start)) s"
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "matrix: failed on diffusers ${failed[*]}"
    exit 1
fi
echo "matrix: passed on diffusers ${VERSIONS[*]}"
