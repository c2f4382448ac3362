"""Run the published HiDiffusion on saved tiny models; executed by the reference Python.

Usage: python run_reference.py SPEC.json  (see tests/diffusers/test_exactness.py for the spec)
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import diffusers  # noqa: E402
from common import build_pipeline, run_case  # noqa: E402
from hidiffusion import apply_hidiffusion  # noqa: E402


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec.get("threads", 2))
    for case in spec["cases"]:
        model_dir = case["model_dir"]
        inputs = torch.load(os.path.join(model_dir, f"inputs_{case['height']}x{case['width']}.pt"))
        pipe = build_pipeline(diffusers, model_dir, case)
        apply_hidiffusion(pipe)
        torch.save(run_case(pipe, case, inputs), case["out"])
        print("done", case["id"], flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
