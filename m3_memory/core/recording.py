"""Choosing keyframes from a camera stream: enough motion since the last kept frame, and not blurred."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation


@dataclass
class KeyframeConfig:
    min_translation_m: float = 0.05     # keep a frame once the camera moved this far since the last kept one...
    min_rotation_deg: float = 5.0       # ...or turned this much
    blur_ratio: float = 0.5             # reject frames sharper than less than this × the recent median (0 = off)
    blur_window: int = 30               # frames in that median


def sharpness(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image `rgb: [H, W, 3]` uint8: low when the frame is motion-blurred."""
    grey = rgb.astype(np.float32).mean(axis=2)
    laplacian = (4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:])
    return float(laplacian.var())


class KeyframeSelector:
    """Decides per posed frame whether it becomes a keyframe; `consider` returns (keep, reason when not kept)."""

    def __init__(self, config: KeyframeConfig):
        self.config = config
        self.last_kept: np.ndarray | None = None
        self.recent_sharpness: deque[float] = deque(maxlen=config.blur_window)

    def consider(self, c2w: np.ndarray, rgb: np.ndarray) -> tuple[bool, str | None]:
        """`c2w: [4, 4]` camera-to-world, `rgb: [H, W, 3]` uint8."""
        score = sharpness(rgb)
        median = float(np.median(self.recent_sharpness)) if self.recent_sharpness else None
        self.recent_sharpness.append(score)
        if self.config.blur_ratio > 0 and median is not None and score < self.config.blur_ratio * median:
            return False, "blurred"
        if self.last_kept is not None:
            moved = np.linalg.norm(c2w[:3, 3] - self.last_kept[:3, 3])
            turned = np.degrees(Rotation.from_matrix(self.last_kept[:3, :3].T @ c2w[:3, :3]).magnitude())
            if moved < self.config.min_translation_m and turned < self.config.min_rotation_deg:
                return False, "no_motion"
        self.last_kept = c2w.copy()
        return True, None
