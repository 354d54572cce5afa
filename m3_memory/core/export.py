"""A memory out to other tools: a `.ply` in the standard 3D Gaussian Splatting layout (what common splat viewers open)
and the decimated coloured point cloud the memory server publishes as `sensor_msgs/PointCloud2` (`point_cloud`).

The PLY's vertex properties, in the order the reference 3DGS code writes them:

    x y z  nx ny nz (zero)  f_dc_0..2  f_rest_0..3(K-1)-1  opacity (logit)  scale_0..2 (log)  rot_0..3 (w, x, y, z)

`f_rest` is channel-major (all of red's higher coefficients, then green's, then blue's), K = (sh_degree + 1)².
With `colours` the DC term is set to render those colours and `f_rest` is zeroed (a view-independent picture: the
semantic PCA or a query's relevancy).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from m3_memory.core.atomic import write_atomic
from m3_memory.core.errors import M3Error
from m3_memory.core.gaussians import SH_C0, rgb_to_sh0
from m3_memory.core.pictures import heat_colours

MIN_OPACITY = 0.1   # more transparent Gaussians are no surface: left out of the point cloud


def gaussian_rgb(memory) -> np.ndarray:
    """View-independent colour `[N, 3]` in [0, 1] of every Gaussian (its degree-0 term, as seen head-on)."""
    sh0 = memory.gaussians.params["sh0"].detach()[:, 0]
    return (SH_C0 * sh0 + 0.5).clamp(0.0, 1.0).cpu().numpy()


def ply_vertices(memory, colours: np.ndarray | None = None) -> np.ndarray:
    """The structured array `[N]` of the PLY's vertex element (module docstring); `colours: [N, 3]` in [0, 1]."""
    p = {name: value.detach().cpu().float() for name, value in memory.gaussians.params.items()}
    n = len(p["means"])
    sh0, rest = p["sh0"][:, 0], p["shN"].transpose(1, 2).reshape(n, -1)      # [N, 3], [N, 3 (K - 1)]
    if colours is not None:
        colours = np.asarray(colours, dtype=np.float32)
        if colours.shape != (n, 3):
            raise M3Error(f"colours must be [{n}, 3], got {colours.shape}")
        sh0, rest = rgb_to_sh0(torch.from_numpy(colours)), torch.zeros_like(rest)
    columns = {"x": p["means"][:, 0], "y": p["means"][:, 1], "z": p["means"][:, 2]}
    columns.update({name: torch.zeros(n) for name in ("nx", "ny", "nz")})
    columns.update({f"f_dc_{i}": sh0[:, i] for i in range(3)})
    columns.update({f"f_rest_{i}": rest[:, i] for i in range(rest.shape[1])})
    columns["opacity"] = p["opacities"]
    columns.update({f"scale_{i}": p["scales"][:, i] for i in range(3)})
    quats = torch.nn.functional.normalize(p["quats"], dim=1)
    columns.update({f"rot_{i}": quats[:, i] for i in range(4)})
    vertices = np.empty(n, dtype=[(name, "<f4") for name in columns])
    for name, column in columns.items():
        vertices[name] = column.numpy()
    return vertices


def export_ply(memory, path: str | Path, colours: np.ndarray | None = None) -> Path:
    """Write the memory's Gaussians to `path` (binary little-endian PLY, 3DGS layout), atomically."""
    from plyfile import PlyData, PlyElement

    data = PlyData([PlyElement.describe(ply_vertices(memory, colours), "vertex")])
    return write_atomic(path, data.write)


def semantic_colours(features: Tensor) -> np.ndarray:
    """RGB `[N, 3]` in [0, 1] from the first three principal components of decoded features `features: [N, d]` (the
    paper's feature picture): each component stretched between its 1st and 99th percentile."""
    x = features.float() - features.float().mean(dim=0)
    _, _, v = torch.pca_lowrank(x, q=3, center=False, niter=4)
    projected = (x @ v[:, :3]).cpu().numpy()
    low, high = np.percentile(projected, [1, 99], axis=0)
    return np.clip((projected - low) / np.maximum(high - low, 1e-9), 0.0, 1.0)


def relevancy_colours(scores: np.ndarray) -> np.ndarray:
    """RGB `[N, 3]` of per-Gaussian query scores `scores: [N]`, stretched to their range, on the heat ramp."""
    scores = np.asarray(scores, dtype=np.float64)
    return heat_colours((scores - scores.min()) / max(float(np.ptp(scores)), 1e-9))


@dataclass
class PointCloud:
    """`xyz: [M, 3]` float32 world points and `rgb: [M, 3]` float32 colours in [0, 1] (`ros.clouds.point_cloud`)."""
    xyz: np.ndarray
    rgb: np.ndarray


def point_cloud(memory, decimation: int = 1, min_opacity: float = MIN_OPACITY) -> PointCloud:
    """Every `decimation`-th Gaussian at least `min_opacity` opaque, as coloured points (for PointCloud2)."""
    if int(decimation) < 1:
        raise M3Error(f"decimation must be a positive integer, got {decimation}")
    opacity = memory.gaussians.opacity.cpu().numpy()
    keep = np.flatnonzero(opacity >= min_opacity)[::int(decimation)]
    xyz = memory.gaussians.means.cpu().numpy()[keep].astype(np.float32)
    return PointCloud(xyz, gaussian_rgb(memory)[keep].astype(np.float32))
