"""Foundation-model feature extractors: one interface (`FeatureExtractor`), models by name from `config/features.yaml`.

    from m3_memory.core.features import build_extractor, FeatureCache, extract_scene
    extractor = build_extractor("m3-tinyvlm")          # or "clip" with user-provided open_clip weights
    feats = extractor.dense(images)                     # [B, h, w, d] unit-norm, h = ceil(H / output_stride)
    text = extractor.encode_text(["a red mug"])          # [1, d] unit-norm; score = feats @ text.T

Kinds: `open_clip` (CLIP & other open_clip ViTs, MaskCLIP dense), `timm_vit` (DINOv2 & other timm ViTs, image
only), `tinyvlm` (m3-tinyvlm, trained here; not CLIP),
`regions` (any model's features pooled over SLIC superpixels). Model modules import lazily (open_clip is heavy).
"""

from m3_memory.core.features.base import (
    FeatureExtractor,
    FeatureModelError,
    ModelIdentity,
    WeightsMissingError,
)
from m3_memory.core.features.cache import FeatureCache, extract_scene, image_sha256
from m3_memory.core.features.registry import (
    FeatureModelConfig,
    build_extractor,
    create_extractor,
    load_configs,
    register_kind,
)

__all__ = [
    "FeatureCache",
    "FeatureExtractor",
    "FeatureModelConfig",
    "FeatureModelError",
    "ModelIdentity",
    "WeightsMissingError",
    "build_extractor",
    "create_extractor",
    "extract_scene",
    "image_sha256",
    "load_configs",
    "register_kind",
]
