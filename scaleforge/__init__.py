"""ScaleForge: distributed training for scaled VLMs and diffusion transformers.

Sub-packages: ``platform`` (runtime), ``launch`` (CLI and job submission), ``models`` (recipes),
``kernels`` (Triton kernel library). They live under one import package because a top-level
``platform`` would shadow Python's standard-library module and ``kernels`` is a published PyPI name.
"""

__version__ = "0.1.0"
