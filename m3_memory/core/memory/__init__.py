"""Scene memory of one foundation model: principal scene components (the bank) and the Gaussian memory attention;
the distillation baseline's MLP decoder in its place."""
from m3_memory.core.memory.attention import MemoryAttention
from m3_memory.core.memory.decoder import Decoder
from m3_memory.core.memory.mlp_decoder import FeatureDecoder
from m3_memory.core.memory.psc import (
    PSCConfig,
    PSCResult,
    exact_cosine,
    principal_scene_components,
)

__all__ = [
    "Decoder",
    "FeatureDecoder",
    "MemoryAttention",
    "PSCConfig",
    "PSCResult",
    "exact_cosine",
    "principal_scene_components",
]
