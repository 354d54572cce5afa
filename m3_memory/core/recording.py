"""Choosing keyframes from a camera stream (enough motion since the last kept frame, not blurred), checking that a
frame's intrinsics fit its image, and counting the frames a stream lost."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from m3_memory.core.errors import M3Error


class FrameError(M3Error, ValueError):
    """A camera frame that cannot be recorded; `reason` is the key it is counted under (bad_image, bad_camera_info)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_intrinsics(K: np.ndarray, width: int, height: int) -> None:
    """Raise FrameError unless `K: [3, 3]` is a pinhole matrix (finite, fx, fy > 0, last row 0 0 1) whose principal
    point lies inside a `width`×`height` image (a CameraInfo of another resolution puts it outside)."""
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0 \
            or not np.allclose(K[2], [0.0, 0.0, 1.0]):
        raise FrameError("bad_camera_info", f"CameraInfo K must be a finite pinhole matrix with fx, fy > 0 and last "
                                            f"row 0 0 1, got {K.ravel().tolist()}")
    cx, cy = K[0, 2], K[1, 2]
    if not (0 < cx < width and 0 < cy < height):
        raise FrameError("bad_camera_info", f"CameraInfo principal point ({cx:g}, {cy:g}) lies outside the "
                                            f"{width}x{height} image: the CameraInfo is for another resolution")


def missing_frames(steps_ns: np.ndarray) -> int:
    """Frames a stream lost, from the steps between its consecutive stamps `steps_ns: [n]`: each step counts as
    round(step / median step) periods (the median is the measured frame period; fewer than 3 steps count nothing)."""
    steps = np.asarray(steps_ns, dtype=np.float64)
    if len(steps) < 3:
        return 0
    period = float(np.median(steps))
    return int(np.maximum(np.rint(steps / period) - 1, 0).sum()) if period > 0 else 0


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
