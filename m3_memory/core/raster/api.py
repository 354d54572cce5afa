"""The single rendering entry point, dispatching to the CPU or the CUDA backend."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from m3_memory.core.raster.cpu import rasterization_cpu
from m3_memory.core.raster.cuda import rasterization_cuda

Backend = Literal["auto", "cpu", "cuda"]


def rasterization(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    backgrounds: Tensor | None = None,
    backend: Backend = "auto",
    eps2d: float = 0.3,
    tile_size: int = 16,
    absgrad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
    """Render N Gaussians into B pinhole cameras.

    Args:
        means: [N, 3] world positions; quats: [N, 4] (w, x, y, z), need not be normalised; scales: [N, 3] linear
        (not log); opacities: [N] in [0, 1]; colors: [N, C] or [B, N, C], any C (RGB + principal queries);
        viewmats: [B, 4, 4] world-to-camera; Ks: [B, 3, 3]; backgrounds: [B, C] or None (black).
        backend: "auto" picks "cuda" (gsplat) for CUDA tensors and "cpu" (ours) otherwise.
        absgrad: also sum |d loss / d means2d| per pixel into ``meta["means2d"].absgrad`` after backward (for
        ``DefaultStrategy(absgrad=True)``).

    Returns:
        render_colors [B, H, W, C], render_alphas [B, H, W, 1], render_depths [B, H, W, 1] (expected depth,
        accumulated z / alpha) and meta: gsplat's non-packed meta (``means2d`` [B, N, 2] in the autograd graph,
        ``radii`` [B, N, 2] int32, ``width``, ``height``, ``n_cameras``, ``gaussian_ids`` None, ...), which
        `gsplat.strategy.DefaultStrategy` consumes unchanged.
    """
    if backend == "auto":
        backend = "cuda" if means.is_cuda else "cpu"
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'cpu' or 'cuda'")
    render = rasterization_cuda if backend == "cuda" else rasterization_cpu
    return render(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, backgrounds=backgrounds, eps2d=eps2d, tile_size=tile_size,
        absgrad=absgrad,
    )  # fmt: skip
