"""Feature-distillation baseline (F-3DGS / Feature Splatting style), the comparison of the paper's Table 1.

The paper's protocol for F-3DGS: each Gaussian carries ONE latent, as large as M3's total principal query (Σ over the
models of `query_dim`: 16 for one model, 32 for two), rendered like colour and shared by all models; each model has
its own small per-pixel MLP decoder (`FeatureDecoder`: latent → hidden → d) that reads the whole latent. The Gaussians
use the "shared" query layout (`GaussianModel.query_slice` is the whole latent for every model), so the per-Gaussian
numbers equal M3's and only the decoders differ. Unlike M3 there is no memory bank: the decoders' outputs are learned.

It is `trainer.train` with those decoders in place of the memory attention: same views, iterations, learning rates (the
MLPs': `config.lr.wm`), densification, RGB loss and cosine + L2 feature loss on `feature_samples` sampled pixels, and
the same checkpoint (decoders of kind "mlp", query layout "shared", `config["method"] = "distill"`), so `load_memory`,
`render_features`, `locate`, `locate_gaussians` and `m3_memory.core.eval.evaluate` use it unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from m3_memory.core.checkpoint import Memory
from m3_memory.core.errors import M3Error
from m3_memory.core.memory import FeatureDecoder
from m3_memory.core.scene import Scene
from m3_memory.core.trainer import Progress, TrainConfig, ViewFeatures, train


@dataclass
class DecoderConfig:
    hidden: int = 64        # latent → hidden → d; raise it to give the baseline a larger parameter budget


def train_distilled(scene: Scene, features: dict[str, ViewFeatures], config: TrainConfig, output: str | Path,
                    decoder: DecoderConfig | None = None,
                    callback: Callable[[Progress], None] | None = None) -> Memory:
    """Train the baseline on `scene` with M3's `config` (the shared latent is `query_dim` × the number of models wide;
    its `query_layout` is set to "shared") and write it to `output` as `trainer.train` does."""
    decoder = decoder or DecoderConfig()
    if not features:
        raise M3Error("feature distillation needs at least one feature model")
    config = replace(config, query_layout="shared")
    latent = config.query_dim * len(features)

    def mlps(feats: dict[str, ViewFeatures], views: np.ndarray) -> dict[str, FeatureDecoder]:
        # learned from the seeded initialisation: unlike a PSC bank, nothing is computed from the training views
        return {name: FeatureDecoder(latent, f.maps[0].shape[-1], decoder.hidden) for name, f in feats.items()}

    return train(scene, features, config, output, callback, decoders=mlps,
                 record={"method": "distill", "decoder": asdict(decoder)})
