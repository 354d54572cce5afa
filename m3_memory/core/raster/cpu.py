"""CPU backend: C++ EWA projection + multi-threaded C++ tile compositing, each with a hand-written backward.

Memory stays bounded by the image and the tile-Gaussian intersection list: no [N, H, W] tensor is ever formed.
For the backward the forward keeps which Gaussians each pixel composited (one bit per tile-Gaussian pair and pixel
of the tile: 32 bytes per pair at 16 x 16 tiles); the backward keeps one gradient buffer per thread, i.e. threads x
B x N x (D + 8) values, D = C + 1 rounded up to a multiple of `PAD`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from m3_memory.core.raster.extension import load_extension
from m3_memory.core.raster.projection import project

PAD = 8  # feature rows hold a multiple of this many channels (the kernel's kPad)


class _Composite(torch.autograd.Function):
    """Front-to-back alpha compositing of binned screen-space Gaussians.

    Inputs: means2d [B, N, 2], conics [B, N, 3], opacities [B, N], features [B, N, D] (D a multiple of `PAD`, zero
    padded past the `used` channels), offsets [B*tiles + 1], flat_ids [n_isects], split. Outputs (no background):
    channels [0, split) [B, H, W, split], channels [split, used) [B, H, W, used - split] (two tensors, so no slicing
    in the graph) and alpha [B, H, W, 1]. The contributor masks are kept only when a gradient can be asked for.
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, offsets, flat_ids, split, used, width, height, tile_size,
                absgrad):
        ext = load_extension()
        tensors = [x.contiguous() for x in (means2d, conics, opacities, features)]
        keep = any(ctx.needs_input_grad[:4])
        head, tail, alpha, *masks = ext.rasterize_forward(*tensors, offsets, flat_ids, split, used, width, height,
                                                          tile_size, keep)  # fmt: skip
        ctx.save_for_backward(*tensors, offsets, flat_ids, *masks)
        ctx.grid = (width, height, tile_size)
        ctx.absgrad = absgrad
        return head, tail, alpha[..., None]

    @staticmethod
    def backward(ctx, v_head, v_tail, v_alpha):
        ext = load_extension()
        means2d, conics, opacities, features, offsets, flat_ids, masks = ctx.saved_tensors
        *grads, v_means2d_abs = ext.rasterize_backward(
            means2d, conics, opacities, features, offsets, flat_ids, masks,
            v_head.contiguous(), v_tail.contiguous(), v_alpha[..., 0].contiguous(), *ctx.grid,
        )  # fmt: skip
        if ctx.absgrad:  # as gsplat: the saved input is meta["means2d"] itself, read by DefaultStrategy(absgrad=True)
            means2d.absgrad = v_means2d_abs
        return (*grads, None, None, None, None, None, None, None, None)


def rasterization_cpu(
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
    """Render colors [N, C] (or per camera [B, N, C]) of N Gaussians into B cameras.

    Returns render_colors [B, H, W, C] (background blended by 1 - alpha), render_alphas [B, H, W, 1], expected depth
    [B, H, W, 1] (accumulated z / alpha) and meta in the non-packed form of gsplat.rasterization.
    """
    ext = load_extension()
    proj = project(means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d)
    B, N = proj.depths.shape
    with torch.no_grad():
        offsets, flat_ids = ext.bin_gaussians(
            proj.means2d.detach().contiguous(), proj.radii.contiguous(), proj.depths.detach().contiguous(),
            width, height, tile_size,
        )  # fmt: skip
    colors = colors.expand(B, N, colors.shape[-1]) if colors.dim() == 2 else colors
    C = colors.shape[-1]
    # depth rides along as the last channel; zero padding to whole vectors keeps the kernel's channel loops free of
    # remainders
    padding = colors.new_zeros(B, N, -(-(C + 1) // PAD) * PAD - C - 1)
    features = torch.cat([colors, proj.depths[..., None], padding], -1)
    opacities_b = opacities.expand(B, N)
    render_colors, depth_sum, alphas = _Composite.apply(
        proj.means2d, proj.conics, opacities_b, features, offsets, flat_ids, C, C + 1, width, height, tile_size,
        absgrad,
    )  # fmt: skip
    depths = depth_sum / alphas.clamp(min=1e-10)
    if backgrounds is not None:
        render_colors = render_colors + (1 - alphas) * backgrounds[:, None, None, :]
    tiles_w, tiles_h = -(-width // tile_size), -(-height // tile_size)
    meta = {
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": proj.radii,
        "means2d": proj.means2d,
        "depths": proj.depths,
        "conics": proj.conics,
        "opacities": opacities_b,
        "tile_width": tiles_w,
        "tile_height": tiles_h,
        "flatten_ids": flat_ids,
        "isect_offsets": offsets[:-1].reshape(B, tiles_h, tiles_w),
        "width": width,
        "height": height,
        "tile_size": tile_size,
        "n_cameras": B,
    }
    return render_colors, alphas, depths, meta
