"""HiDiffusion in Stable Diffusion WebUI (AUTOMATIC1111 v1.10, Forge, reForge).

The WebUI script is ``scripts/hidiffusion.py`` at the repository root (the root is the
extension). Here: the controls and infotext (:mod:`.options`, torch-free), the reading of
the WebUIs' ldm-layout U-Nets (:mod:`.structure`), one sampling run's hooks
(:mod:`.patch`) and the glue to the WebUIs' sampler (:mod:`.host`). See docs/webui.md.
"""
