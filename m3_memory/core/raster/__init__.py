"""Differentiable 3D Gaussian rasterizer with one entry point and two backends.

`rasterization` follows gsplat's `rasterization()` contract: CUDA tensors go to gsplat, CPU tensors to our
multi-threaded C++ tile rasterizer (build it once with ``python -m m3_memory.cli.build_raster``).
"""

from m3_memory.core.raster.api import rasterization

__all__ = ["rasterization"]
