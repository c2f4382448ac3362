"""hidiff: HiDiffusion for diffusers Stable Diffusion pipelines."""
