"""hidiff's HiDiffusion as an InvokeAI node pack: link or copy this folder into InvokeAI's
``nodes/`` directory (see README.md here). The node itself lives in the hidiff library
(``hidiff.invokeai.nodes``), which must be installed in InvokeAI's Python."""

from hidiff.invokeai.nodes import HiDiffusionDenoiseLatentsInvocation

__all__ = ["HiDiffusionDenoiseLatentsInvocation"]
