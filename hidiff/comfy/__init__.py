"""hidiff as ComfyUI nodes. ``nodes`` has the node classes; ``patch`` applies HiDiffusion to a
ComfyUI ``ModelPatcher``. Nothing here imports ComfyUI or diffusers at import time."""
