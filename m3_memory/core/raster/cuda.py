"""CUDA backend: a thin call of gsplat.rasterization (imported lazily, only here)."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def rasterization_cuda(
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
    eps2d: float = 0.3,
    tile_size: int = 16,
    absgrad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
    """Same contract as `rasterization_cpu`, rendered by gsplat in "RGB+ED" mode with the depth channel split off."""
    try:
        import gsplat
    except ImportError as err:
        raise ImportError("the CUDA backend needs gsplat: pip install gsplat==1.5.3 packaging") from err

    render, alphas, meta = gsplat.rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, tile_size=tile_size, backgrounds=backgrounds,
        render_mode="RGB+ED", packed=False, rasterize_mode="classic", absgrad=absgrad,
    )  # fmt: skip
    return render[..., :-1], alphas, render[..., -1:], meta
