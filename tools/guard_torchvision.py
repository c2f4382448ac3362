"""Make the registry's torchvision import beside a CPU build of torch (run by the install scripts).

The registry's torchvision wheels are built against CUDA: with CPU torch their C ops do not load
and `import torchvision` fails in _meta_registrations.py ("operator torchvision::nms does not
exist"). ComfyUI and InvokeAI import torchvision, so the two fake kernels are registered only when
the ops exist. Idempotent (the pattern is gone once replaced). Usage: python guard_torchvision.py
[PATH to _meta_registrations.py; default: the running Python's torchvision].
"""

import importlib.util
import pathlib
import re
import sys

if len(sys.argv) > 1:
    path = pathlib.Path(sys.argv[1])
else:
    path = (
        pathlib.Path(importlib.util.find_spec("torchvision").submodule_search_locations[0]) / "_meta_registrations.py"
    )
text = path.read_text()
pattern = re.compile(r'^@torch\.library\.register_fake\(("torchvision::q?nms")\)$', re.M)
if pattern.search(text):
    text = pattern.sub(
        r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))"
        r"  # hidiff tools/guard_torchvision.py",
        text,
    )
    path.write_text(text)
    print("guarded the nms fake registrations in", path)
