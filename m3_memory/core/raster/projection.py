"""EWA projection of 3D Gaussians to screen space (pure torch, differentiable).

Follows gsplat 1.5.3's pinhole projection (classic mode) so that the CPU and CUDA backends render the same image:
the Jacobian is evaluated at the mean clamped to 1.3x the field of view, ``eps2d`` is added to the 2D covariance,
and the screen bounds are 3.33 sigma per axis, tightened to where opacity * exp(-sigma) falls below 1/255.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0
MAX_EXTEND = 3.33


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


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] from (w, x, y, z) quaternions [..., 4], normalised here."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )  # fmt: skip
    return torch.stack(rows, -1).reshape(quats.shape[:-1] + (3, 3))


def valid_gaussians(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor) -> Tensor:
    """Mask [N] of Gaussians that can be projected: finite parameters, a non-zero quaternion and a non-zero scale."""
    with torch.no_grad():
        # x * 0 is NaN exactly where x is inf or NaN, and a row sum keeps it: on CPU several times cheaper than
        # isfinite().all(-1)
        finite = (torch.cat([means, quats, scales, opacities[:, None]], -1) * 0).sum(-1) == 0
        return finite & (quats.abs().amax(-1) > 0) & (scales.abs().amax(-1) > 0)


def _sanitise(x: Tensor, keep: Tensor, fill: Tensor) -> Tensor:
    # torch.where routes exactly zero gradient to the rejected branch, so NaN/inf never reaches the backward.
    return torch.where(keep.reshape(keep.shape + (1,) * (x.dim() - keep.dim())), x, fill)


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
    ok = valid_gaussians(means, quats, scales, opacities)
    if not bool(ok.all()):  # the usual case needs neither the four where() nor their backward
        one_quat = means.new_tensor([1.0, 0.0, 0.0, 0.0])
        means = _sanitise(means, ok, means.new_zeros(3))
        quats = _sanitise(quats, ok, one_quat)
        scales = _sanitise(scales, ok, means.new_ones(3))
        opacities = _sanitise(opacities, ok, means.new_zeros(()))

    # The camera-frame covariance is M M^T with M = R rot diag(scales), the 2D one (J M)(J M)^T: M for all
    # Gaussians and cameras is one [3B, 3] x [3, 3N] matrix product, far cheaper on CPU than N batched 3x3 ones.
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]  # [B, 3, 3], [B, 3]
    B, N = R.shape[0], means.shape[0]
    m = quat_to_rotmat(quats) * scales[:, None, :]  # [N, 3, 3]
    M = (R.reshape(3 * B, 3) @ m.permute(1, 0, 2).reshape(3, 3 * N)).reshape(B, 3, N, 3)  # M[b, i, n, j]
    # unbind, not indexing: the backward of one index is a zero tensor the size of the whole input
    M0, M1, M2 = M.unbind(1)  # [B, N, 3]
    x, y, z = (means @ R.transpose(1, 2) + t[:, None]).unbind(-1)  # camera frame, [B, N] each
    in_depth = ok & (z >= near_plane) & (z <= far_plane)
    inv_z = 1 / torch.where(in_depth, z, torch.ones_like(z))  # kept finite for culled entries
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [B, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # Jacobian at the mean clamped to 1.3x the field of view: stabler for Gaussians far off-screen.
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.15 * width / fx, cx / fx + 0.15 * width / fx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.15 * height / fy, cy / fy + 0.15 * height / fy
    xn, yn = x * inv_z, y * inv_z  # normalised image coordinates
    ux = torch.minimum(torch.maximum(xn, -lim_x_neg), lim_x_pos)[..., None]  # tx / z, ty / z
    uy = torch.minimum(torch.maximum(yn, -lim_y_neg), lim_y_pos)[..., None]
    # J = [[fx / z, 0, -fx tx / z^2], [0, fy / z, -fy ty / z^2]]: rows of J M without the zero terms,
    # J M row 0 = fx / z (M_0 - tx / z M_2)
    j0 = (fx * inv_z)[..., None] * (M0 - ux * M2)  # [B, N, 3]
    j1 = (fy * inv_z)[..., None] * (M1 - uy * M2)
    c00, c01, c11 = (j0 * j0).sum(-1) + eps2d, (j0 * j1).sum(-1), (j1 * j1).sum(-1) + eps2d
    det = c00 * c11 - c01 * c01
    in_depth = in_depth & (det > 0)
    det = torch.where(in_depth, det, torch.ones_like(det))
    conics = torch.stack([c11, -c01, c00], -1) * (1 / det)[..., None]
    means2d = torch.stack([fx * xn + cx, fy * yn + cy], -1)

    with torch.no_grad():
        opac = opacities.expand_as(z)
        visible = in_depth & (opac >= ALPHA_MIN)
        extend = torch.sqrt(2 * torch.log(opac.clamp_min(ALPHA_MIN) / ALPHA_MIN)).clamp_max(MAX_EXTEND)
        radii = torch.stack([torch.ceil(extend * c00.clamp_min(0).sqrt()), torch.ceil(extend * c11.clamp_min(0).sqrt())], -1)
        mx, my = means2d[..., 0], means2d[..., 1]
        rx, ry = radii[..., 0], radii[..., 1]
        on_screen = (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        visible &= on_screen & (radii > 0).any(-1)
        radii = torch.where(visible[..., None], radii, torch.zeros_like(radii)).to(torch.int32)
    # depths are a node of their own: their gradient is the rasterizer's alone, as gsplat's depths output
    return Projection(means2d=means2d, conics=conics, depths=z.clone(), radii=radii)
