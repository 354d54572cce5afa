"""Region features (paper §3.3): one embedding per segmentation region, duplicated over every pixel of the region.

The M3 authors use region models (SEEM, LLaMA) whose outputs are per-mask embeddings. Here the regions come from
SLIC superpixels (scikit-image; no weights needed) and each region's embedding is the mean of a wrapped model's dense
features inside it, so any configured extractor (`options.base`) gains a region-level variant. Its features are
piecewise constant, which is what makes the paper's similarity reduction (θ = 1.0 for SEEM) collapse them exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from m3_memory.core.features.base import FeatureExtractor, FeatureModelError
from m3_memory.core.features.registry import FeatureModelConfig, build_extractor, register_kind


def superpixels(image: np.ndarray, size: tuple[int, int], n_segments: int, compactness: float) -> np.ndarray:
    """SLIC labels `[h, w]` int64 (0..R-1) of `image: [H, W, 3]` uint8 resized to `size = (h, w)`."""
    from skimage.segmentation import slic

    small = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    return slic(small, n_segments=n_segments, compactness=compactness, start_label=0).astype(np.int64)


def pool_regions(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`features: [h, w, d]`, `labels: [h, w]` -> `[h, w, d]`: each region's unit-norm mean feature all over it."""
    flat = labels.flatten()
    sums = torch.zeros(int(flat.max()) + 1, features.shape[-1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, flat, features.flatten(0, 1))
    return F.normalize(sums, dim=-1)[flat].view(features.shape)


@register_kind("regions")
class RegionExtractor(FeatureExtractor):
    """Wraps the configured model `options.base`; `options.n_segments` (default 150), `options.compactness` (10)."""

    def __init__(self, config: FeatureModelConfig, config_path=None) -> None:
        base_name = config.options.get("base")
        if not base_name:
            raise FeatureModelError(f"model {config.name!r} (kind regions) needs options.base: the model to pool")
        self.base = build_extractor(base_name, config_path, output_stride=config.output_stride)
        self.n_segments = int(config.options.get("n_segments", 150))
        self.compactness = float(config.options.get("compactness", 10.0))
        self.name = config.name
        self.dim = self.base.dim
        self.patch_size, self.tile_size, self.min_side = self.base.patch_size, self.base.tile_size, self.base.min_side
        self.output_stride = config.output_stride
        self.batch_size = config.batch_size
        self.device = self.base.device
        arch = f"slic(n={self.n_segments},c={self.compactness:g})/{self.base.identity.key}"
        self.identity = self.make_identity(arch, self.base.identity.weights_sha256)

    def _encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.base._encode_tiles(tiles)

    def _encode_global(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.base._encode_global(tiles)

    def dense(self, images: np.ndarray) -> torch.Tensor:
        """`images: [B, H, W, 3]` uint8 -> `[B, h, w, dim]`: the base model's features, constant per superpixel."""
        images = np.asarray(images).reshape(-1, *np.shape(images)[-3:])
        features = self.base.dense(images)
        labels = [superpixels(image, features.shape[1:3], self.n_segments, self.compactness) for image in images]
        return torch.stack([pool_regions(f, torch.from_numpy(l).to(f.device)) for f, l in zip(features, labels)])

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.base.encode_text(texts)
