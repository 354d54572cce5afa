"""CLIP (and other open_clip ViTs) with MaskCLIP dense features that stay in the joint image-text space.

MaskCLIP (Zhou et al. 2022), as the M3 authors use it for ViT-L/14: the last transformer block's query-key mixing
smooths every patch token towards the class token, so for each patch we take only the block's value path
(ln_1 -> value projection -> out projection), then `ln_post` and the visual projection `proj`: the same head that maps
the class token into the text space, now applied per patch, so a text embedding scores every patch.

Weights are an open_clip checkpoint file on disk (`pretrained=<path>`): loading never touches a network.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from m3_memory.core.features.base import FeatureExtractor, FeatureModelError, file_sha256, resolve_weights
from m3_memory.core.features.registry import FeatureModelConfig, register_kind

DOWNLOAD_HINT = (
    "No package registry ships CLIP weights. On a machine with internet, in a venv with open_clip_torch==3.3.0:\n"
    "  python -c \"import open_clip; print(open_clip.download_pretrained("
    "open_clip.get_pretrained_cfg('{arch}', 'openai'), cache_dir='clip_weights'))\"\n"
    "then copy the printed file to {path}, or point `weights:` in config/features.yaml at it (a .bin/.pt file keeps "
    "its extension: open_clip picks the loader by it)."
)


@register_kind("open_clip")
class OpenClipExtractor(FeatureExtractor):
    """An open_clip ViT (`config.arch`, e.g. ViT-B-32, ViT-L-14) loaded from `config.weights`.

    `dense` gives MaskCLIP patch features, `encode_image` CLIP's pooled image embedding, `encode_text` CLIP's text
    embedding; all `[.., dim]` with `dim` = the model's embedding width (512 for ViT-B-32, 768 for ViT-L-14).
    """

    def __init__(self, config: FeatureModelConfig, config_path=None) -> None:
        import open_clip  # heavy (imports torchvision); only when an open_clip model is built

        path = resolve_weights(config, f"~/.cache/m3_memory/weights/{config.arch}-openai.safetensors",
                               DOWNLOAD_HINT.replace("{arch}", config.arch))
        self.device = torch.device(config.device)
        model = open_clip.create_model(config.arch, pretrained=str(path) if path else None, device=self.device)
        self.model = model.eval()
        visual = model.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.attn_pool is not None:
            raise FeatureModelError(
                f"{config.arch}: MaskCLIP dense features need an open_clip VisionTransformer without attention "
                f"pooling; got {type(visual).__name__}"
            )
        last = visual.transformer.resblocks[-1]
        if not isinstance(last.attn, nn.MultiheadAttention):
            raise FeatureModelError(f"{config.arch}: last block's attention is not nn.MultiheadAttention")
        cfg = open_clip.get_model_preprocess_cfg(model)
        self._mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)
        self._tokenizer = open_clip.get_tokenizer(config.arch)
        self.name = config.name
        self.dim = int(visual.output_dim)
        self.patch_size = int(visual.patch_size[0])
        self.tile_size = int(visual.image_size[0])
        self.min_side = config.min_side
        self.output_stride = config.output_stride
        self.batch_size = config.batch_size
        self.identity = self.make_identity(f"open_clip:{config.arch}", file_sha256(path) if path else None)

    def _normalize(self, tiles: torch.Tensor) -> torch.Tensor:
        return (tiles - self._mean) / self._std

    def _encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        tokens = visual._embeds(self._normalize(tiles))  # [N, 1 + g*g, width] (class token first)
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            tokens = block(tokens)
        last = blocks[-1]
        width = tokens.shape[-1]
        bias = last.attn.in_proj_bias
        values = F.linear(last.ln_1(tokens[:, 1:]), last.attn.in_proj_weight[2 * width :],
                          None if bias is None else bias[2 * width :])
        patches = visual.ln_post(last.ls_1(last.attn.out_proj(values))) @ visual.proj  # [N, g*g, dim]
        grid_h, grid_w = (s // self.patch_size for s in tiles.shape[-2:])
        return patches.unflatten(1, (grid_h, grid_w))

    def _encode_global(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self._normalize(tiles))

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self._tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)
