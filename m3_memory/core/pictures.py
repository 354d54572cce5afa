"""Pictures of an answer: the rendered colour with the query's heatmap laid over it and the chosen region outlined.

`save_answer_pictures(answer, rendered_rgb, directory, stem)` writes `directory/stem.png` for an `engine.Answer`; the
caller renders the answer's heatmap view (`memory.render(answer.heatmap_camera).rgb`), so a caller that
already rendered it (the viewer, the memory server) does not render twice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from m3_memory.core.atomic import write_atomic
from m3_memory.core.errors import M3Error

# Stops of the heat ramp (value → RGB in [0, 1]): dark blue, cyan, green, yellow, red; distinguishable in print.
_RAMP_VALUES = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_RAMP_COLOURS = np.array([[0.05, 0.05, 0.45], [0.0, 0.75, 0.9], [0.2, 0.85, 0.2], [1.0, 0.9, 0.0], [0.9, 0.05, 0.05]])
OUTLINE_RGB = (255, 0, 255)   # magenta: no demo object has it, so the outline is never mistaken for the scene


def heat_colours(values: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] (`[..., 3]`) of `values: [...]` in [0, 1] (clipped) on the heat ramp."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    return np.stack([np.interp(v, _RAMP_VALUES, _RAMP_COLOURS[:, c]) for c in range(3)], axis=-1)


def to_uint8(rgb) -> np.ndarray:
    """`rgb: [H, W, 3]` (a tensor or array, float in [0, 1] or uint8) as a uint8 array."""
    array = rgb.detach().cpu().numpy() if hasattr(rgb, "detach") else np.asarray(rgb)
    if array.dtype == np.uint8:
        return array
    return (np.clip(array, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def overlay(rgb, heatmap: np.ndarray, mask: np.ndarray | None = None, strength: float = 0.55,
            outline_px: int = 2) -> np.ndarray:
    """`[H, W, 3]` uint8: `rgb: [H, W, 3]` blended with the heat colours of `heatmap: [H, W]` (in [0, 1]; pixels weigh
    by their score, so the background stays visible), and the boundary of `mask: [H, W]` drawn `outline_px` wide."""
    base = to_uint8(rgb).astype(np.float64) / 255
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.shape != base.shape[:2]:
        raise M3Error(f"heatmap {heatmap.shape} and image {base.shape[:2]} differ in size: render the heatmap's view")
    weight = strength * np.clip(heatmap, 0, 1)[..., None]
    out = to_uint8((1 - weight) * base + weight * heat_colours(heatmap))
    if mask is not None and mask.any():
        mask = np.asarray(mask, dtype=bool)
        edge = mask & ~ndimage.binary_erosion(mask, iterations=outline_px, border_value=0)
        out[edge] = OUTLINE_RGB
    return out


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write `image: [H, W, 3]` uint8 atomically as PNG."""
    return write_atomic(path, lambda handle: Image.fromarray(image).save(handle, format="PNG"))


def save_answer_pictures(answer, rendered_rgb, directory: str | Path, stem: str) -> Path | None:
    """Write `directory/stem.png`: `rendered_rgb: [H, W, 3]` of `answer.heatmap_camera` with `answer.heatmap` over it
    and `answer.mask` outlined. None when the answer has no heatmap (no view saw the target)."""
    if answer.heatmap is None:
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return save_png(directory / f"{stem}.png", overlay(rendered_rgb, answer.heatmap, answer.mask))
