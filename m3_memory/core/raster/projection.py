"""EWA projection of 3D Gaussians to screen space: fused C++ forward and hand-written backward, per Gaussian.

Follows gsplat 1.5.3's pinhole projection (classic mode) so that the CPU and CUDA backends render the same image:
the Jacobian is evaluated at the mean clamped to 1.3x the field of view, ``eps2d`` is added to the 2D covariance,
and the screen bounds are 3.33 sigma per axis, tightened to where opacity * exp(-sigma) falls below 1/255.
Non-finite or degenerate Gaussians (zero quaternion or scale) are culled. As in gsplat, culled Gaussian-camera
pairs get no gradient, and the cameras are constants (no pose gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from m3_memory.core.raster.extension import load_extension


@dataclass
class Projection:
    """Screen-space Gaussians for B cameras; entries with ``radii == 0`` are culled.

    means2d: [B, N, 2] pixel coordinates; conics: [B, N, 3] inverse 2D covariance (a, b, c) of
    ``0.5 * (a dx^2 + c dy^2) + b dx dy``; depths: [B, N] camera z; radii: [B, N, 2] int32 bounds in pixels.
    """

    means2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor


class _Project(torch.autograd.Function):
    """means [N, 3], quats [N, 4], scales [N, 3] -> means2d [B, N, 2], conics [B, N, 3], depths [B, N], radii
    [B, N, 2]; opacities [N] only decide the bounds and the culling (no gradient)."""

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmats, Ks, settings):
        tensors = [x.contiguous() for x in (means, quats, scales, opacities, viewmats, Ks)]
        means2d, conics, depths, radii = load_extension().project_forward(*tensors, *settings)
        ctx.mark_non_differentiable(radii)
        ctx.save_for_backward(*tensors, radii)
        ctx.settings = settings
        return means2d, conics, depths, radii

    @staticmethod
    def backward(ctx, v_means2d, v_conics, v_depths, _v_radii):
        *tensors, radii = ctx.saved_tensors
        v_means, v_quats, v_scales = load_extension().project_backward(
            *tensors, radii, v_means2d.contiguous(), v_conics.contiguous(), v_depths.contiguous(), *ctx.settings
        )
        return v_means, v_quats, v_scales, None, None, None, None


def project(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> Projection:
    """Project N Gaussians (means [N, 3], quats [N, 4], scales [N, 3], opacities [N]) into B pinhole cameras
    (viewmats [B, 4, 4] world-to-camera, Ks [B, 3, 3]); culls invalid, off-screen and out-of-depth-range ones."""
    if torch.is_grad_enabled() and (viewmats.requires_grad or Ks.requires_grad):
        raise ValueError("the CPU projection has no gradient for viewmats or Ks: pass them detached")
    settings = (width, height, near_plane, far_plane, eps2d)
    means2d, conics, depths, radii = _Project.apply(means, quats, scales, opacities, viewmats, Ks, settings)
    return Projection(means2d=means2d, conics=conics, depths=depths, radii=radii)
