#!/usr/bin/env bash
# Set up hidiff from nothing: .venv (the project, current diffusers, test extras) and
# .venv-ref (the published hidiffusion 0.1.10 on diffusers 0.27.2, which the exactness
# tests compare against). Idempotent: re-running only fills in what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${HIDIFF_TORCH:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then "$PYTHON" -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check "$TORCH"
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"

if [ ! -x .venv-ref/bin/python ]; then "$PYTHON" -m venv .venv-ref; fi
.venv-ref/bin/pip install -q --disable-pip-version-check "$TORCH"
# peft must NOT be in this environment: diffusers 0.27.2 takes its LoRA code paths with it.
.venv-ref/bin/pip install -q --disable-pip-version-check \
    "hidiffusion==0.1.10" "diffusers==0.27.2" "transformers==4.44.2" "huggingface_hub==0.25.2" \
    accelerate safetensors "numpy<2"
