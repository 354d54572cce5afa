"""DINOv2 and other timm ViTs: image-only dense features (no text side), e.g. for the paper's DINOv2 slice.

The dense feature of a patch is the backbone's final (normed) patch token, the usual DINOv2 feature; the pooled
embedding is timm's pre-logits head output. Weights are a local file (`timm` state dict, .pth/.bin/.safetensors)
loaded through timm's own pretrained-file path (it adapts position embeddings to `tile_size`): no network.
"""

from __future__ import annotations

import torch

from m3_memory.core.features.base import FeatureExtractor, force_offline, resolve_weights
from m3_memory.core.storage import file_sha256
from m3_memory.core.features.registry import FeatureModelConfig, register_kind

DOWNLOAD_HINT = (
    "No package registry ships DINOv2 weights. On a machine with internet, in a venv with timm==1.0.31:\n"
    "  python -c \"import timm, torch; torch.save(timm.create_model('{arch}', pretrained=True).state_dict(), "
    "'{arch}.pth')\"\n"
    "then copy {arch}.pth to {path}, or point `weights:` in config/features.yaml at it."
)


@register_kind("timm_vit")
class TimmVitExtractor(FeatureExtractor):
    """A timm ViT (`config.arch`, e.g. vit_small_patch14_dinov2, vit_base_patch14_dinov2) at `tile_size` pixels;
    `config.options` are passed to `timm.create_model`."""

    def __init__(self, config: FeatureModelConfig, config_path=None) -> None:
        force_offline()  # timm would fetch a missing pretrained file from the Hugging Face Hub
        import timm  # only when a timm model is built

        path = resolve_weights(config, f"~/.cache/m3_memory/weights/{config.arch}.pth",
                               DOWNLOAD_HINT.replace("{arch}", config.arch))
        self.device = torch.device(config.device)
        overlay = {"file": str(path)} if path else None
        model = timm.create_model(config.arch, pretrained=path is not None, pretrained_cfg_overlay=overlay,
                                  num_classes=0, img_size=config.tile_size, **config.options)
        self.model = model.to(self.device).eval()
        self._mean = torch.tensor(model.pretrained_cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(model.pretrained_cfg["std"], device=self.device).view(1, 3, 1, 1)
        self.name = config.name
        self.dim = int(model.num_features)
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.tile_size = int(model.patch_embed.img_size[0])
        self.min_side = config.min_side
        self.output_stride = config.output_stride
        self.batch_size = config.batch_size
        self.identity = self.make_identity(f"timm:{config.arch}", file_sha256(path) if path else None)

    def _encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features((tiles - self._mean) / self._std)  # [N, prefix + g*g, C]
        grid_h, grid_w = (s // self.patch_size for s in tiles.shape[-2:])
        return tokens[:, self.model.num_prefix_tokens :].unflatten(1, (grid_h, grid_w))

    def _encode_global(self, tiles: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features((tiles - self._mean) / self._std)
        return self.model.forward_head(features, pre_logits=True)
