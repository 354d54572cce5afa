"""Feature-distillation baseline (F-3DGS / Feature Splatting style), the comparison of the paper's Table 1.

Each Gaussian carries a low-dim latent per model (the same l dims as M3's principal query, held in the model's query
slice), rendered like colour; a small per-pixel MLP decoder (`FeatureDecoder`: l → hidden → d) lifts it to the
foundation model's d dims. Unlike M3 there is no memory bank: the decoder's outputs are learned.

It is `trainer.train` with that decoder in place of the memory attention: same views, iterations, learning rates (the
MLP's: `config.lr.wm`), densification, RGB loss and cosine + L2 feature loss on `feature_samples` sampled pixels, and
the same checkpoint (decoders of kind "mlp", `config["method"] = "distill"`), so `load_memory`, `render_features`,
`locate`, `locate_gaussians` and `m3_memory.core.eval.evaluate` use it unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from m3_memory.core.checkpoint import Memory
from m3_memory.core.errors import M3Error
from m3_memory.core.memory import FeatureDecoder
from m3_memory.core.scene import Scene
from m3_memory.core.trainer import Progress, TrainConfig, ViewFeatures, train


@dataclass
class DecoderConfig:
    hidden: int = 64        # l → hidden → d; raise it to give the baseline a larger parameter budget


def train_distilled(scene: Scene, features: dict[str, ViewFeatures], config: TrainConfig, output: str | Path,
                    decoder: DecoderConfig | None = None,
                    callback: Callable[[Progress], None] | None = None) -> Memory:
    """Train the baseline on `scene` with M3's `config` (its `query_dim` is the latent size per model) and write it to
    `output` as `trainer.train` does."""
    decoder = decoder or DecoderConfig()
    if not features:
        raise M3Error("feature distillation needs at least one feature model")

    def mlps(feats: dict[str, ViewFeatures], views: np.ndarray) -> dict[str, FeatureDecoder]:
        # learned from the seeded initialisation: unlike a PSC bank, nothing is computed from the training views
        return {name: FeatureDecoder(config.query_dim, f.maps[0].shape[-1], decoder.hidden)
                for name, f in feats.items()}

    return train(scene, features, config, output, callback, decoders=mlps,
                 record={"method": "distill", "decoder": asdict(decoder)})
