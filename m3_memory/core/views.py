"""Cameras and what a memory renders from them: the one render + decode path of the query engine and evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from m3_memory.core.errors import M3Error
from m3_memory.core.raster import rasterization


@dataclass
class Camera:
    """One pinhole view: `c2w: [4, 4]` camera-to-world (optical convention: x right, y down, z forward), `K: [3, 3]`."""
    c2w: np.ndarray
    K: np.ndarray
    width: int
    height: int

    def __post_init__(self):
        self.c2w = np.asarray(self.c2w, dtype=np.float64)
        self.K = np.asarray(self.K, dtype=np.float64)
        if self.c2w.shape != (4, 4) or self.K.shape != (3, 3):
            raise M3Error(f"a camera needs c2w [4, 4] and K [3, 3], got {self.c2w.shape} and {self.K.shape}")
        if not (np.all(np.isfinite(self.c2w)) and np.all(np.isfinite(self.K))):
            raise M3Error("the view pose or intrinsics are not finite")
        rotation = self.c2w[:3, :3]
        if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-4) or np.linalg.det(rotation) < 0:
            raise M3Error("the view's rotation is not a rotation (orthonormal, determinant 1)")
        if not (int(self.width) > 0 and int(self.height) > 0):
            raise M3Error(f"the view's image size {self.width}x{self.height} must be positive")
        if not (self.K[0, 0] > 0 and self.K[1, 1] > 0):
            raise M3Error(f"the view's focal lengths ({self.K[0, 0]}, {self.K[1, 1]}) must be positive")
        self.width, self.height = int(self.width), int(self.height)

    @property
    def center(self) -> np.ndarray:
        return self.c2w[:3, 3]

    def scaled(self, factor: float) -> "Camera":
        """The same view at `factor` × the resolution (intrinsics scaled with it)."""
        if factor == 1.0:
            return self
        width, height = max(1, round(self.width * factor)), max(1, round(self.height * factor))
        K = self.K.copy()
        K[0] *= width / self.width
        K[1] *= height / self.height
        return Camera(self.c2w, K, width, height)


@dataclass
class TrainingViews:
    """The cameras a memory was trained from: `c2w: [n, 4, 4]`, `K: [n, 3, 3]`, one image size."""
    c2w: np.ndarray
    K: np.ndarray
    width: int
    height: int

    def __post_init__(self):
        self.c2w = np.asarray(self.c2w, dtype=np.float64).reshape(-1, 4, 4)
        self.K = np.asarray(self.K, dtype=np.float64).reshape(-1, 3, 3)
        self.width, self.height = int(self.width), int(self.height)

    def __len__(self) -> int:
        return len(self.c2w)

    def camera(self, index: int) -> Camera:
        return Camera(self.c2w[index], self.K[index], self.width, self.height)


@dataclass
class RenderedView:
    """One view of a memory: `rgb: [H, W, 3]`, `alpha: [H, W]`, expected `depth: [H, W]` (metres along z),
    `values: [H, W, C]` (the per-Gaussian values asked for), `features[model]: [H, W, d]` (decoded, when asked for)."""
    camera: Camera
    rgb: Tensor | None
    alpha: Tensor
    depth: Tensor
    values: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)


def _camera_tensors(memory, camera: Camera) -> tuple[Tensor, Tensor]:
    """`c2w [1, 4, 4]`, `K [1, 3, 3]` on the memory's device."""
    device = memory.gaussians.means.device
    return (torch.as_tensor(camera.c2w, dtype=torch.float32, device=device)[None],
            torch.as_tensor(camera.K, dtype=torch.float32, device=device)[None])


def render_memory(memory, camera: Camera, models: list[str] | tuple[str, ...] = (), rgb: bool = True) -> RenderedView:
    """Render `memory` from `camera`: colour, alpha, depth and, for each of `models`, the principal queries decoded
    through that model's decoder (the paper's path: render queries, decode per pixel)."""
    with torch.no_grad():
        c2w, K = _camera_tensors(memory, camera)
        out = memory.gaussians.render(c2w, K, camera.width, camera.height)
        queries = out["queries"][0]
        features = {name: memory.attentions[name].decode_map(queries[..., memory.gaussians.query_slice(name)])
                    for name in models}
    return RenderedView(camera, out["rgb"][0] if rgb else None, out["alpha"][0, ..., 0], out["depth"][0, ..., 0],
                        features=features)


def render_values(memory, camera: Camera, values: Tensor) -> RenderedView:
    """Alpha-blend per-Gaussian `values: [N, C]` (e.g. a query's per-Gaussian scores) into `camera`: a few channels
    instead of colour + queries + decoding, which is what makes a text query cheap."""
    with torch.no_grad():
        g = memory.gaussians
        c2w, K = _camera_tensors(memory, camera)
        image, alpha, depth, _ = rasterization(g.means, g.rotations, g.scales, g.opacity,
                                               values.to(g.means.device, torch.float32), torch.linalg.inv(c2w), K,
                                               camera.width, camera.height)
    return RenderedView(camera, None, alpha[0, ..., 0], depth[0, ..., 0], values=image[0])
