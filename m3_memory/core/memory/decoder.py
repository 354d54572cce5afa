"""What a memory asks of a per-model decoder: M3's memory attention and the distillation baseline's MLP both are one."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Decoder(Protocol):
    """Rendered principal queries (or latents) of one model → that model's features.

    `bank_size`: rows of the principal-scene-component bank, None for a decoder without one (the MLP)."""

    bank_size: int | None

    def __call__(self, queries: Tensor) -> Tensor:
        """queries [P, l] → features [P, d]."""

    def decode_map(self, query_map: Tensor) -> Tensor:
        """query_map [H, W, l] → [H, W, d]."""
