"""A node pack for the real-server tests: ``hidiff_test_unet_digest`` reports the state of the
U-Net in InvokeAI's model cache (a hash of every parameter and buffer, the torch hooks on its
modules, hidiff's patch attribute, the geometry of its convolutions), so a test can check that a
HiDiffusion denoise hands the cached model back exactly as it found it."""

import hashlib
import json
from typing import Optional

import torch
from invokeai.invocation_api import (
    BaseInvocation,
    ImageField,
    Input,
    InputField,
    InvocationContext,
    StringOutput,
    UNetField,
    invocation,
)

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs")


def unet_state(unet: torch.nn.Module) -> dict:
    digest = hashlib.sha256()
    for name, tensor in sorted({**dict(unet.named_parameters()), **dict(unet.named_buffers())}.items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    hooks = sum(len(getattr(m, d, {}) or {}) for m in unet.modules() for d in HOOK_DICTS)
    convs = [
        [n, list(m.stride), list(m.padding) if not isinstance(m.padding, str) else m.padding]
        for n, m in unet.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    patched = any(hasattr(m, "_hidiff_patch") for m in unet.modules())
    return {"sha256": digest.hexdigest(), "hooks": hooks, "patched": patched, "convs": convs}


@invocation("hidiff_test_unet_digest", title="hidiff test: U-Net digest", category="testing", version="1.0.0")
class UNetDigestInvocation(BaseInvocation):
    """The cached U-Net's state, as JSON."""

    unet: UNetField = InputField(input=Input.Connection)
    after: Optional[ImageField] = InputField(
        default=None, input=Input.Connection, description="run after this image is made"
    )

    def invoke(self, context: InvocationContext) -> StringOutput:
        loaded = context.models.load(self.unet.unet)
        with loaded.model_in_ram() as unet:
            return StringOutput(value=json.dumps(unet_state(unet)))
