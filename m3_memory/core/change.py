"""Change detection: which Gaussians of a memory new depth views see through (the place is now empty).

A second scan of a place where something moved observes free space where the memory still holds Gaussians: the
camera sees the table *behind* where the old object's Gaussians are. `seen_through` finds those Gaussians so an
incremental update can prune them; static parts (observed where they are, or hidden behind something) keep theirs.

Why per-Gaussian projection and not the rendered depth: a rendered depth is an alpha blend of many Gaussians, so a
pixel where it disagrees with the observation does not say *which* Gaussian is wrong (a blend of a floating speck and
the table reads as "in front" although the table Gaussians are right). Projecting each Gaussian's centre tests the one
fact that matters for it: is the space where it sits observed as empty? The observation is what decides, not the
memory, so Gaussians hidden behind other Gaussians of the memory (the inside of a moved object) are found as well.

Per view and Gaussian (centre at camera depth z, projected to pixel (u, v), observed depth D there):

- *seen through*: z < D_min - max(margin_m, relative · D_min), where D_min is the nearest valid observed depth
  within the Gaussian's 2D footprint (a window of its projected size, at least `footprint_px`): the whole footprint
  looks past it, so a Gaussian at an object's silhouette, whose centre falls on the background by a pixel, is not
  counted.
- *seen*: |z - D| ≤ max(margin_m, relative · D): the view observes a surface where the Gaussian is.
- neither: it is behind the observed surface (occluded), outside the image, in front of the near plane, on a pixel
  without depth (0), or too transparent to be visible (`min_opacity`). Those views say nothing.

A Gaussian is flagged when it is seen through in at least `min_views` views and those make up more than
`min_fraction` of the views that see it or see through it, so one bad depth pixel or one misregistered view prunes
nothing, and a Gaussian that some views confirm needs a clear majority against it.

An object's base cannot be told from what it stood on by depth: the Gaussians of its bottom centimetres lie within
the margin of the table the new views see there, and they keep its features. Objects move as a whole, so the
Gaussians within `grow_m` of a *cluster* of flagged ones (at least `cluster_min` flagged within `grow_m`; a lone
floater takes nothing with it) are flagged too, once (no flood fill). The support surface just under the old place
goes with them; the new views observe it there, so an update seeds it again from them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import Tensor

from m3_memory.core.errors import M3Error
from m3_memory.core.gaussians import GaussianModel


@dataclass
class ChangeConfig:
    margin_m: float = 0.03        # a Gaussian must lie in front of the observed depth by more than this (metres)...
    relative: float = 0.04        # ...and by more than this fraction of the observed depth (depth noise grows with it)
    min_views: int = 2            # seen through in at least this many views: noise in one view prunes nothing
    min_fraction: float = 0.5     # seen-through views must be more than this fraction of the views that observe it
    min_opacity: float = 0.05     # more transparent Gaussians are invisible to a camera: their views do not count
    footprint_px: int = 1         # smallest footprint half-width (pixels) checked for a nearer observed surface
    max_footprint_px: int = 8     # largest one: a huge Gaussian is judged on its core (bounded cost per view)
    footprint_sigmas: float = 1.0  # footprint half-width in projected standard deviations of the Gaussian
    near_m: float = 0.05          # Gaussians nearer the camera than this are not judged by that view
    grow_m: float = 0.05          # flag also what lies this close to a cluster of flagged Gaussians (0: off)...
    cluster_min: int = 8          # ...a cluster: a flagged Gaussian with at least this many flagged within grow_m

    def __post_init__(self):
        if self.margin_m < 0 or self.relative < 0:
            raise M3Error(f"change margins must be ≥ 0, got margin_m={self.margin_m}, relative={self.relative}")
        if self.min_views < 1:
            raise M3Error(f"min_views must be ≥ 1, got {self.min_views}")
        if not 0 <= self.min_fraction < 1:
            raise M3Error(f"min_fraction must lie in [0, 1), got {self.min_fraction}")
        if self.grow_m < 0 or self.cluster_min < 1:
            raise M3Error(f"need grow_m ≥ 0 and cluster_min ≥ 1, got {self.grow_m} and {self.cluster_min}")
        if not 0 <= self.footprint_px <= self.max_footprint_px:
            raise M3Error(f"need 0 ≤ footprint_px ≤ max_footprint_px, got {self.footprint_px} and "
                          f"{self.max_footprint_px}")


@dataclass
class ChangeVotes:
    """Per-Gaussian view counts: `through: [N]` views that see through it, `seen: [N]` views that observe it there."""
    through: Tensor
    seen: Tensor

    def flagged(self, config: ChangeConfig) -> Tensor:
        """`[N]` bool: seen through in ≥ `min_views` views and in more than `min_fraction` of its observing views."""
        through, seen = self.through.float(), self.seen.float()
        return (self.through >= config.min_views) & (through > config.min_fraction * (through + seen))


def grow_clusters(means: Tensor, flagged: Tensor, config: ChangeConfig) -> Tensor:
    """`flagged: [N]` bool plus every Gaussian (`means: [N, 3]`) within `grow_m` of a flagged one that has at least
    `cluster_min` flagged neighbours within `grow_m` (module docstring: an object's base goes with it)."""
    if config.grow_m == 0 or int(flagged.sum()) <= config.cluster_min:
        return flagged
    points = means[flagged].cpu().numpy()
    neighbours = cKDTree(points).query_ball_point(points, config.grow_m, return_length=True) - 1
    cores = points[neighbours >= config.cluster_min]
    if len(cores) == 0:
        return flagged
    distance, _ = cKDTree(cores).query(means.cpu().numpy(), distance_upper_bound=config.grow_m)
    return flagged | torch.from_numpy(np.isfinite(distance)).to(flagged.device)


def _footprint_levels(config: ChangeConfig) -> list[int]:
    """Window half-widths checked, doubling from `footprint_px` to `max_footprint_px` (a few min-pools per view)."""
    levels, r = [], config.footprint_px
    while r < config.max_footprint_px:
        levels.append(r)
        r = max(1, 2 * r)
    return levels + [config.max_footprint_px]


def _nearest_depth(depth: Tensor, radius: int) -> Tensor:
    """`[H, W]` nearest valid depth within a (2 radius + 1)² window of `depth: [H, W]` (0 = none → +inf)."""
    far = torch.where(depth > 0, depth, torch.full_like(depth, float("inf")))
    if radius == 0:
        return far
    return -F.max_pool2d(-far[None, None], 2 * radius + 1, stride=1, padding=radius)[0, 0]


@torch.no_grad()
def change_votes(gaussians: GaussianModel, c2w: Tensor, Ks: Tensor, depths: Tensor, width: int, height: int,
                 config: ChangeConfig) -> ChangeVotes:
    """Count, per Gaussian, the views that see through it and the views that observe it (module docstring).

    `c2w: [n, 4, 4]`, `Ks: [n, 3, 3]`, `depths: [n, H, W]` observed metres along the optical axis (0 = no depth).
    """
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or Ks.shape != (c2w.shape[0], 3, 3):
        raise M3Error(f"need c2w [n, 4, 4] and Ks [n, 3, 3], got {tuple(c2w.shape)} and {tuple(Ks.shape)}")
    if depths.shape != (c2w.shape[0], height, width):
        raise M3Error(f"depths must be [n, H, W] = [{c2w.shape[0]}, {height}, {width}], got {tuple(depths.shape)}")
    means = gaussians.means
    device = means.device
    n_gauss = means.shape[0]
    through = torch.zeros(n_gauss, dtype=torch.int32, device=device)
    seen = torch.zeros(n_gauss, dtype=torch.int32, device=device)
    visible = gaussians.opacity >= config.min_opacity
    sigma = gaussians.scales.amax(dim=1)   # [N] largest standard deviation: the footprint's extent
    levels = _footprint_levels(config)
    w2c = torch.linalg.inv(c2w.to(device, torch.float32))
    Ks = Ks.to(device, torch.float32)
    depths = depths.to(device, torch.float32)
    for view in range(c2w.shape[0]):
        cam = means @ w2c[view, :3, :3].T + w2c[view, :3, 3]          # [N, 3]
        z = cam[:, 2]
        K = Ks[view]
        front = visible & (z > config.near_m)
        zs = torch.where(front, z, torch.ones_like(z))
        # Pixel (u, v) covers image coordinates [u, u + 1) (geometry.backproject_pixels' convention).
        u = torch.floor(K[0, 0] * cam[:, 0] / zs + K[0, 2]).long()
        v = torch.floor(K[1, 1] * cam[:, 1] / zs + K[1, 2]).long()
        inside = front & (u >= 0) & (u < width) & (v >= 0) & (v < height)
        idx = inside.nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        ui, vi, zi = u[idx], v[idx], z[idx]
        observed = depths[view][vi, ui]
        has_depth = observed > 0
        tol = torch.clamp_min(config.relative * observed, config.margin_m)
        is_seen = has_depth & ((zi - observed).abs() <= tol)
        # Footprint half-width in pixels, rounded up to the next checked level.
        radius_px = config.footprint_sigmas * sigma[idx] * K[0, 0] / zi
        nearest = torch.full_like(zi, float("inf"))
        assigned = torch.zeros_like(has_depth)
        for r in levels:
            take = ~assigned & ((radius_px <= r) | (r == levels[-1]))
            if take.any():
                nearest[take] = _nearest_depth(depths[view], r)[vi[take], ui[take]]
                assigned |= take
        tol_near = torch.clamp_min(config.relative * nearest, config.margin_m)
        is_through = has_depth & (zi < nearest - tol_near)   # a valid centre pixel keeps `nearest` finite
        through[idx] += is_through.int()
        seen[idx] += is_seen.int()
    return ChangeVotes(through=through, seen=seen)


def seen_through(gaussians: GaussianModel, c2w: Tensor, Ks: Tensor, depths: Tensor, width: int, height: int,
                 config: ChangeConfig) -> Tensor:
    """`c2w [n, 4, 4]`, `Ks [n, 3, 3]`, `depths [n, H, W]` observed metres (0 = no depth) → `[N]` bool: the
    Gaussians that the views see through (the camera sees something farther behind them, where they are) in
    ≥ `min_views` views and in more than `min_fraction` of the views that observe them, with the base of each
    cluster of them (`grow_clusters`; module docstring)."""
    flagged = change_votes(gaussians, c2w, Ks, depths, width, height, config).flagged(config)
    return grow_clusters(gaussians.means, flagged, config)
