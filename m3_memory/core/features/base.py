"""The feature-extractor interface: model identity, pixel-aligned dense features from tiles, and the shared pipeline.

Every model implements two small hooks on normalised-to-[0, 1] RGB tiles (`_encode_tiles` -> patch-token grid,
`_encode_global` -> one embedding per tile); tiling, resizing, overlap averaging, upsampling to pixels and
normalisation live here once. Features are unit-norm so a text embedding scores a pixel by a dot product.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from m3_memory.core.errors import M3Error

RANDOM_INIT = "RANDOM-INIT"


class FeatureModelError(M3Error, ValueError):
    """A feature model that cannot be built or used as configured; the message says what to fix."""


class WeightsMissingError(FeatureModelError, FileNotFoundError):
    """A configured weights file is absent; the message says where it goes and how to obtain it."""


@dataclass(frozen=True)
class ModelIdentity:
    """Which feature space a memory lives in: model name + architecture + sha256 of its weights file + the
    preprocessing that changes the features (`pipeline`: tile size, minimum side, output stride).

    `weights_sha256 = None` marks randomly initialised weights: such features mean nothing, and the key says so loudly.
    """

    name: str
    arch: str
    weights_sha256: str | None
    pipeline: str = ""

    @property
    def random_init(self) -> bool:
        return self.weights_sha256 is None

    @property
    def key(self) -> str:
        """File-name safe identity string (`name--arch--sha256[:16]--pipeline`), stored in every cache entry."""
        digest = RANDOM_INIT if self.random_init else self.weights_sha256[:16]
        safe = lambda text: "".join(c if c.isalnum() or c in "._-" else "_" for c in text)  # noqa: E731
        return "--".join(safe(part) for part in (self.name, self.arch, digest, self.pipeline))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelIdentity":
        return cls(**data)


def warn_random_init(name: str) -> None:
    """Say loudly that a model runs on random weights (allowed for tests and timing only)."""
    warnings.warn(f"feature model {name!r} uses RANDOM weights: its features are meaningless (tests/timing only)",
                  stacklevel=3)


def resolve_weights(config, default_path: str, hint: str) -> Path | None:
    """The existing weights file of `config` (a FeatureModelConfig), or None when random init is allowed.

    Otherwise raises WeightsMissingError naming the expected path (`default_path` if none is configured) and `hint`
    (how to get the file; `{path}` in it is filled in).
    """
    path = config.weights_path()
    if path is not None and path.exists():
        return path
    if not config.allow_random_init:
        where = path or Path(default_path).expanduser()
        raise WeightsMissingError(
            f"feature model {config.name!r}: weights file {where} not found.\n" + hint.format(path=where)
        )
    warn_random_init(config.name)
    return None


def force_offline() -> None:
    """Make every Hugging Face Hub request of this process fail instead of downloading: models load from disk only.

    huggingface_hub reads HF_HUB_OFFLINE once, when it is imported, so an already imported one is switched as well.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def tile_offsets(length: int, tile: int, multiple: int) -> list[int]:
    """Start offsets of as few `tile`-long windows as cover `length`, each a multiple of `multiple`, ends flush."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / tile) + 1
    return sorted({int(round(x / multiple)) * multiple for x in np.linspace(0, length - tile, count)})


class FeatureExtractor(ABC):
    """A foundation model seen as a map from images to pixel-aligned features in a `dim`-dimensional space.

    Subclasses set `name`, `dim`, `identity`, `patch_size` (pixels per output token), `tile_size` (square tile side
    the model sees; None = the whole image at once, for fully convolutional models), `min_side` (smaller images are
    upscaled to this short side first; None = `tile_size`) and `output_stride` (pixels per row/column of `dense()`
    output), and implement `_encode_tiles` / `_encode_global` (and `encode_text` when the
    model has a text side).
    """

    name: str
    dim: int
    identity: ModelIdentity
    patch_size: int
    tile_size: int | None
    min_side: int | None = None
    output_stride: int = 4
    batch_size: int = 8
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def _encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """`tiles: [N, 3, S, S']` float RGB in [0, 1] -> patch tokens `[N, S / patch, S' / patch, dim]` (any norm)."""

    @abstractmethod
    def _encode_global(self, tiles: torch.Tensor) -> torch.Tensor:
        """`tiles: [N, 3, S, S']` float RGB in [0, 1] -> one image embedding per tile `[N, dim]` (any norm)."""

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """`texts` (T phrases) -> unit-norm embeddings `[T, dim]` in the image features' space."""
        raise FeatureModelError(f"feature model {self.name!r} has no text side; use a vision-language model")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """`(h, w)` of `dense()` output for `height x width` images: ceil of the size over `output_stride`."""
        return math.ceil(height / self.output_stride), math.ceil(width / self.output_stride)

    def _to_tensor(self, images: np.ndarray) -> torch.Tensor:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise FeatureModelError(f"images must be [B, H, W, 3] uint8 RGB, got {images.dtype} {images.shape}")
        # torch.tensor copies: inputs may be read-only memmaps / PIL views
        return torch.tensor(images, device=self.device).permute(0, 3, 1, 2).float() / 255.0

    def _working_size(self, height: int, width: int) -> tuple[int, int]:
        """Size the image is resized to before tiling: short side at least `min_side` (default one tile), both sides
        multiples of the patch size."""
        scale = max(1.0, (self.min_side or self.tile_size or 0) / min(height, width))
        snap = lambda x: max(self.patch_size, int(round(x * scale / self.patch_size)) * self.patch_size)  # noqa: E731
        return snap(height), snap(width)

    def _batched(self, fn, tiles: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(tiles[i : i + self.batch_size]) for i in range(0, len(tiles), self.batch_size)])

    @torch.inference_mode()
    def dense(self, images: np.ndarray) -> torch.Tensor:
        """`images: [B, H, W, 3]` uint8 -> unit-norm features `[B, h, w, dim]` float32, `(h, w) = output_size(H, W)`.

        The image is resized so that tiles of `tile_size` cover it (overlapping where they must), patch tokens of
        overlapping tiles are averaged on one token canvas, and the canvas is bilinearly upsampled to the output grid
        (pixel-centre aligned: output cell (i, j) sits at image pixel ((j + 0.5) * stride - 0.5, ...)).
        """
        pixels = self._to_tensor(images)
        batch, _, height, width = pixels.shape
        work_h, work_w = self._working_size(height, width)
        pixels = F.interpolate(pixels, size=(work_h, work_w), mode="bilinear", align_corners=False, antialias=True)
        tile_h, tile_w = (self.tile_size, self.tile_size) if self.tile_size else (work_h, work_w)
        ys = tile_offsets(work_h, tile_h, self.patch_size)
        xs = tile_offsets(work_w, tile_w, self.patch_size)
        tiles = torch.stack([pixels[:, :, y : y + tile_h, x : x + tile_w] for y in ys for x in xs], dim=1)
        tokens = self._batched(self._encode_tiles, tiles.flatten(0, 1)).float()  # [B * T, gh, gw, d]
        tokens = tokens.unflatten(0, (batch, len(ys) * len(xs))).permute(0, 1, 4, 2, 3)  # [B, T, d, gh, gw]
        p, (gh, gw) = self.patch_size, tokens.shape[-2:]
        canvas = tokens.new_zeros(batch, self.dim, work_h // p, work_w // p)
        count = tokens.new_zeros(1, 1, work_h // p, work_w // p)
        for t, (y, x) in enumerate((y, x) for y in ys for x in xs):
            canvas[:, :, y // p : y // p + gh, x // p : x // p + gw] += tokens[:, t]
            count[:, :, y // p : y // p + gh, x // p : x // p + gw] += 1
        size = self.output_size(height, width)
        canvas = F.interpolate(canvas / count, size=size, mode="bilinear", align_corners=False)
        return F.normalize(canvas, dim=1).permute(0, 2, 3, 1).contiguous()

    @torch.inference_mode()
    def encode_image(self, images: np.ndarray) -> torch.Tensor:
        """`images: [B, H, W, 3]` uint8 -> unit-norm whole-image embeddings `[B, dim]` (image squashed to one tile)."""
        pixels = self._to_tensor(images)
        size = (self.tile_size, self.tile_size) if self.tile_size else self._working_size(*pixels.shape[-2:])
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
        return F.normalize(self._batched(self._encode_global, pixels).float(), dim=-1)

    def make_identity(self, arch: str, weights_sha256: str | None) -> ModelIdentity:
        """Identity of this extractor once `name`, `tile_size`, `min_side` and `output_stride` are set."""
        pipeline = f"t{self.tile_size or 'full'}-m{self.min_side or 'tile'}-s{self.output_stride}"
        return ModelIdentity(self.name, arch, weights_sha256, pipeline)

    def describe(self) -> str:
        warning = "  [RANDOM WEIGHTS: features are meaningless]" if self.identity.random_init else ""
        return f"{self.name} ({self.identity.arch}, dim {self.dim}, identity {self.identity.key}){warning}"
