"""The M3 Gaussian scene: 3DGS parameters plus one principal-query slice per foundation model.

Parameters live in an `nn.ParameterDict` under the names gsplat's `DefaultStrategy` expects, so densification (clone,
split, prune) is gsplat's code acting on every tensor alike, the queries included. The periodic opacity reset is ours,
`reset_opacities` (gsplat 1.5.3's never fires: `step % reset_every == 0 & step > 0` is always false):

    means [N, 3]  scales [N, 3] (log)  quats [N, 4] (w, x, y, z)  opacities [N] (logit)
    sh0 [N, 1, 3]  shN [N, K-1, 3]  (K = (sh_degree + 1)²)   queries [N, l] (l = Σ per-model query dims)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor, nn

from m3_memory.core.raster import rasterization

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
         1.445305721320277, -0.5900435899266435)


def sh_basis(dirs: Tensor, degree: int) -> Tensor:
    """Real spherical-harmonic basis of unit `dirs: [..., 3]` up to `degree` (0-3) → `[..., (degree + 1)²]`."""
    if not 0 <= degree <= 3:
        raise ValueError(f"sh_degree must be 0..3, got {degree}")
    x, y, z = dirs.unbind(-1)
    terms = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        terms += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        terms += [SH_C2[0] * x * y, SH_C2[1] * y * z, SH_C2[2] * (2 * zz - xx - yy), SH_C2[3] * x * z,
                  SH_C2[4] * (xx - yy)]
    if degree >= 3:
        terms += [SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * x * y * z, SH_C3[2] * y * (4 * zz - xx - yy),
                  SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[4] * x * (4 * zz - xx - yy),
                  SH_C3[5] * z * (xx - yy), SH_C3[6] * x * (xx - 3 * yy)]
    return torch.stack(terms, dim=-1)


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """Colour in [0, 1] → the degree-0 coefficient that renders it (inverse of `SH_C0 * c + 0.5`)."""
    return (rgb - 0.5) / SH_C0


@dataclass
class GaussianConfig:
    sh_degree: int = 1               # view-dependent colour; 3 as in 3DGS costs CPU time for little on a tabletop
    init_opacity: float = 0.1
    init_scale_neighbours: int = 3   # initial scale: mean distance to this many nearest points
    query_init_std: float = 0.1      # principal queries start as small random vectors (then learned)


@torch.no_grad()
def reset_opacities(params: nn.ParameterDict, optimizer: torch.optim.Adam, ceiling: float) -> None:
    """3DGS's opacity reset: every opacity (logit `params["opacities"]: [N]`) is clamped to at most `ceiling` in (0, 1)
    and Adam's moments of all of them are zeroed (their step counts kept), so stale momentum does not undo the reset.
    In place: the Parameter and the optimizer's references to it stay the same."""
    if not 0 < ceiling < 1:
        raise ValueError(f"opacity reset ceiling must lie in (0, 1), got {ceiling}")
    opacities = params["opacities"]
    opacities.clamp_(max=float(torch.logit(torch.tensor(ceiling))))
    for key, value in optimizer.state.get(opacities, {}).items():
        if key != "step":
            value.zero_()


# "split": each model reads its own slice of the queries (M3); "shared": every model reads the whole latent of
# Σ query_dims (the distillation baseline, F-3DGS's protocol: one latent, one decoder per model).
QUERY_LAYOUTS = ("split", "shared")


class GaussianModel(nn.Module):
    """3D Gaussians with per-model principal queries.

    `query_dims`: model name → query slice width (16 per model in the paper's headline setting), in slice order;
    `query_layout`: one of QUERY_LAYOUTS (queries are Σ query_dims wide in both).
    """

    def __init__(self, params: dict[str, Tensor], query_dims: dict[str, int], sh_degree: int,
                 query_layout: str = "split"):
        super().__init__()
        if query_layout not in QUERY_LAYOUTS:
            raise ValueError(f"query_layout must be one of {QUERY_LAYOUTS}, got {query_layout!r}")
        self.params = nn.ParameterDict({name: nn.Parameter(value) for name, value in params.items()})
        self.query_dims = dict(query_dims)
        self.query_layout = query_layout
        self.sh_degree = sh_degree
        total = sum(self.query_dims.values())
        if self.params["queries"].shape[1] != total:
            raise ValueError(f"queries have {self.params['queries'].shape[1]} dims, query_dims sum to {total}")

    @classmethod
    def from_points(cls, xyz: np.ndarray, rgb: np.ndarray, query_dims: dict[str, int], config: GaussianConfig,
                    seed: int = 0, query_layout: str = "split") -> "GaussianModel":
        """Initialise one Gaussian per point: `xyz: [P, 3]`, `rgb: [P, 3]` in [0, 1]."""
        xyz = np.asarray(xyz, dtype=np.float64)
        if xyz.ndim != 2 or xyz.shape[1] != 3 or len(xyz) < 2:
            raise ValueError(f"need at least 2 initial points [P, 3], got shape {xyz.shape}")
        if not np.all(np.isfinite(xyz)):
            raise ValueError("initial points contain NaN or infinite coordinates")
        k = min(config.init_scale_neighbours, len(xyz) - 1)
        distances, _ = cKDTree(xyz).query(xyz, k=k + 1)
        spacing = np.maximum(distances[:, 1:].mean(axis=1), 1e-4)
        n = len(xyz)
        generator = torch.Generator().manual_seed(seed)
        n_coeffs = (config.sh_degree + 1) ** 2
        params = {
            "means": torch.as_tensor(xyz, dtype=torch.float32),
            "scales": torch.log(torch.as_tensor(spacing, dtype=torch.float32))[:, None].repeat(1, 3),
            "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
            "opacities": torch.logit(torch.full((n,), config.init_opacity)),
            "sh0": rgb_to_sh0(torch.as_tensor(rgb, dtype=torch.float32))[:, None, :],
            "shN": torch.zeros(n, n_coeffs - 1, 3),
            "queries": torch.randn(n, sum(query_dims.values()), generator=generator) * config.query_init_std,
        }
        return cls(params, query_dims, config.sh_degree, query_layout)

    def __len__(self) -> int:
        return self.params["means"].shape[0]

    # The fields in their natural units (detached): what readers of a memory use instead of raw parameters.
    @property
    def means(self) -> Tensor:
        """`[N, 3]` world positions."""
        return self.params["means"].detach()

    @property
    def opacity(self) -> Tensor:
        """`[N]` in [0, 1]."""
        return torch.sigmoid(self.params["opacities"].detach())

    @property
    def scales(self) -> Tensor:
        """`[N, 3]` standard deviations along the Gaussian's axes (metres)."""
        return torch.exp(self.params["scales"].detach())

    @property
    def rotations(self) -> Tensor:
        """`[N, 4]` unit quaternions (w, x, y, z)."""
        return torch.nn.functional.normalize(self.params["quats"].detach(), dim=1)

    def queries(self, model: str) -> Tensor:
        """`[N, l]` principal queries of `model`'s slice."""
        return self.params["queries"].detach()[:, self.query_slice(model)]

    def query_slice(self, model: str) -> slice:
        """The columns of the queries that `model`'s decoder reads: its own slice, or all of them when shared."""
        start = 0
        for name, dim in self.query_dims.items():
            if name == model:
                if self.query_layout == "shared":
                    return slice(0, sum(self.query_dims.values()))
                return slice(start, start + dim)
            start += dim
        raise KeyError(f"no query slice for model {model!r}; this memory holds {list(self.query_dims)}")

    def query_width(self, model: str) -> int:
        """Query dims `model`'s decoder reads (its slice's width)."""
        cols = self.query_slice(model)
        return cols.stop - cols.start

    def colors(self, camtoworlds: Tensor, sh_degree: int | None = None) -> Tensor:
        """View-dependent RGB `[B, N, 3]` for cameras `camtoworlds: [B, 4, 4]` (or `[N, 3]` when degree 0)."""
        degree = self.sh_degree if sh_degree is None else min(sh_degree, self.sh_degree)
        coeffs = torch.cat([self.params["sh0"], self.params["shN"]], dim=1)[:, :(degree + 1) ** 2]
        if degree == 0:
            return torch.clamp_min(SH_C0 * coeffs[:, 0] + 0.5, 0.0)
        dirs = self.params["means"][None] - camtoworlds[:, None, :3, 3]
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        return torch.clamp_min(torch.einsum("bnk,nkc->bnc", sh_basis(dirs, degree), coeffs) + 0.5, 0.0)

    def render(self, camtoworlds: Tensor, Ks: Tensor, width: int, height: int, sh_degree: int | None = None,
               background: Tensor | None = None, backend: str = "auto") -> dict:
        """Render colour and principal queries from `camtoworlds: [B, 4, 4]`, `Ks: [B, 3, 3]`.

        Returns `rgb [B, H, W, 3]`, `queries [B, H, W, l]`, `alpha [B, H, W, 1]`, `depth [B, H, W, 1]` (expected depth)
        and the rasterizer's `meta` (for densification).
        """
        p = self.params
        rgb = self.colors(camtoworlds, sh_degree)
        queries = p["queries"]
        if rgb.ndim == 3:
            queries = queries[None].expand(rgb.shape[0], -1, -1)
        colors = torch.cat([rgb, queries], dim=-1)
        backgrounds = None
        if background is not None:
            backgrounds = torch.cat([background, background.new_zeros(queries.shape[-1])])[None].expand(
                camtoworlds.shape[0], -1)
        render, alpha, depth, meta = rasterization(
            p["means"], p["quats"], torch.exp(p["scales"]), torch.sigmoid(p["opacities"]), colors,
            torch.linalg.inv(camtoworlds), Ks, width, height, backgrounds=backgrounds, backend=backend)
        return {"rgb": render[..., :3], "queries": render[..., 3:], "alpha": alpha, "depth": depth, "meta": meta}
