"""The feature-distillation baseline's decoder (F-3DGS's "speed-up module", a per-pixel 1×1 conv): a rendered latent
[l] → hidden → a foundation-model feature [d], learned; no memory bank. Same interface as `MemoryAttention`, so a memory
may hold either (`m3_memory.core.distill` trains it, `m3_memory.core.checkpoint` stores it as kind "mlp")."""
from __future__ import annotations

import torch
from torch import nn


class FeatureDecoder(nn.Module):
    """Per-pixel MLP from a rendered latent to a foundation-model feature."""

    def __init__(self, latent_dim: int, feature_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim))

    bank_size = None   # learned outputs, no memory bank

    @property
    def dims(self) -> tuple[int, int, int]:
        """(l, hidden, d)."""
        return self.net[0].in_features, self.net[0].out_features, self.net[2].out_features

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [P, l] -> decoded features [P, d]."""
        return self.net(latents)

    def decode_map(self, latent_map: torch.Tensor) -> torch.Tensor:
        """latent_map [H, W, l] -> [H, W, d] (no [P, t] scores here, so no chunking is needed)."""
        h, w, l = latent_map.shape
        return self.net(latent_map.reshape(h * w, l)).reshape(h, w, -1)
