"""hidiff as an InvokeAI host: HiDiffusion in InvokeAI's SD 1.x/2.x/SDXL denoising.

InvokeAI denoises with diffusers U-Nets, so this host is the diffusers host seen through one
InvokeAI denoise: ``run`` tells the diffusers patch which steps really run and what the task
is, and applies it for that denoise only (never importing InvokeAI); ``nodes`` defines the
InvokeAI node (importing InvokeAI). The node pack under ``invokeai_nodes/`` loads ``nodes``.
"""
