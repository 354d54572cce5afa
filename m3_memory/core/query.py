"""Text queries against a memory: per-pixel scores, the confident region, its 3D point and a grasp pose."""
from __future__ import annotations

import unicodedata

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from m3_memory.core.errors import QueryError
from m3_memory.core.geometry import backproject_pixels

# CLIP's text encoder reads 77 tokens; a phrase far past this many characters is a mistake, not a query.
DEFAULT_MAX_QUERY_CHARS = 256


def validate_query(text: str, max_chars: int = DEFAULT_MAX_QUERY_CHARS) -> str:
    """Return the query stripped of surrounding white space, or raise QueryError saying what is wrong with it."""
    if not isinstance(text, str):
        raise QueryError(f"query must be text, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise QueryError("query is empty: name the object, e.g. 'yellow bath duck'")
    if len(stripped) > max_chars:
        raise QueryError(f"query is {len(stripped)} characters long; the limit is {max_chars}: use a short phrase")
    if any(unicodedata.category(c) == "Cc" and c != "\t" for c in stripped):
        raise QueryError("query contains control characters (new lines or NUL): send one line of text")
    if any(unicodedata.category(c) == "Cf" for c in stripped):
        raise QueryError("query contains invisible formatting characters (zero-width or bidi controls): send plain text")
    if not any(unicodedata.category(c)[0] in "LN" for c in stripped):
        raise QueryError(f"query {stripped!r} has no letters or digits: name the object, e.g. 'yellow bath duck'")
    return stripped


# LERF's canonical negatives: a phrase must beat each of them to count as relevant.
CANONICAL_NEGATIVES = ("object", "things", "stuff", "texture")


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Threshold maximising the between-class variance of `values: [P]` (Otsu 1979); values above it are the
    foreground class."""
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mean_low = np.cumsum(hist * centers) / np.maximum(weight_low, 1)
    mean_high = (np.sum(hist * centers) - np.cumsum(hist * centers)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])  # low class = bins up to and including the argmax


def relevancy(features: Tensor, positive: Tensor, negatives: Tensor, temperature: float = 0.1) -> Tensor:
    """LERF relevancy of `features: [P, d]` for `positive: [d]` against `negatives: [k, d]` → `[P]` in [0, 1]:
    min over negatives of softmax(cos_pos, cos_neg)[pos]."""
    feats = F.normalize(features, dim=-1)
    return relevancy_from_cosines(feats @ F.normalize(positive, dim=-1), feats @ F.normalize(negatives, dim=-1).T,
                                  temperature)


def relevancy_from_cosines(positive: Tensor, negatives: Tensor, temperature: float = 0.1) -> Tensor:
    """`relevancy` from cosines already taken: `positive: [P]`, `negatives: [P, k]` → `[P]`."""
    return torch.sigmoid((positive[:, None] - negatives) / temperature).min(dim=1).values


def score_pixels(features: Tensor, text: Tensor, negatives: Tensor | None, method: str) -> Tensor:
    """Per-pixel score in [0, 1] of `features: [P, d]` for `text: [d]`, comparable across views: "otsu" maps cosine
    similarity to [0, 1] (the paper then thresholds it with Otsu), "relevancy" is LERF's (needs `negatives`)."""
    if method == "relevancy":
        if negatives is None:
            raise QueryError("relevancy scoring needs negative phrases (e.g. CANONICAL_NEGATIVES)")
        return relevancy(features, text, negatives)
    if method != "otsu":
        raise QueryError(f"unknown scoring method {method!r}: use 'otsu' or 'relevancy'")
    return (F.normalize(features, dim=-1) @ F.normalize(text, dim=-1) + 1) / 2


def small_mode_threshold(values: np.ndarray, max_fraction: float = 0.25) -> float:
    """Otsu's threshold of `values: [P]`, applied again within the foreground while it holds more than `max_fraction`
    of the values: a small object is a tiny mode beside a spread-out background, where one split cuts the background."""
    threshold = otsu_threshold(values)
    for _ in range(8):
        above = values[values > threshold]
        if above.size <= max_fraction * values.size or above.size < 2 or np.ptp(above) == 0:
            break
        threshold = otsu_threshold(above)
    return threshold


def select_regions(score: np.ndarray, valid: np.ndarray, method: str, peak_pixels: int = 5) -> list[np.ndarray]:
    """The confident regions of `score: [H, W]` within `valid`, best first: the connected components over the
    threshold (relevancy > 0.5, or `small_mode_threshold`) ranked by peak (the mean of their `peak_pixels` best
    pixels; specks smaller than that last). Ranking by peak rather than by summed score keeps a large near blob of a
    similar colour from winning over the small object that matches best."""
    values = score[valid]
    if values.size == 0:
        return []
    threshold = small_mode_threshold(values) if method == "otsu" else 0.5
    labels, count = ndimage.label((score > threshold) & valid)
    if count == 0:
        return []
    flat_labels, flat_scores = labels.ravel(), score.ravel()
    inside = flat_labels > 0
    order = np.lexsort((-flat_scores[inside], flat_labels[inside]))        # by component, best pixel first
    sorted_labels, sorted_scores = flat_labels[inside][order], flat_scores[inside][order]
    starts = np.searchsorted(sorted_labels, np.arange(1, count + 1))
    sizes = np.bincount(sorted_labels, minlength=count + 1)[1:]
    peaks = np.array([sorted_scores[s:s + min(peak_pixels, n)].mean() for s, n in zip(starts, sizes)])
    peaks[sizes < peak_pixels] -= 2.0   # scores are in [0, 1]
    return [labels == 1 + int(k) for k in np.argsort(-peaks, kind="stable")]


def select_region(score: np.ndarray, valid: np.ndarray, method: str) -> np.ndarray:
    """The best of `select_regions` (an empty mask when there is none)."""
    regions = select_regions(score, valid, method)
    return regions[0] if regions else np.zeros_like(valid)


def backproject(mask: np.ndarray, depth: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """World points `[P, 3]` of the `mask: [H, W]` pixels with positive `depth: [H, W]` (metres)."""
    vs, us = np.nonzero(mask & (depth > 0))
    return backproject_pixels(us, vs, depth[vs, us], K, c2w)


def grasp_pose(points: np.ndarray, camera_center: np.ndarray, mode: str = "normal") -> np.ndarray:
    """`[4, 4]` grasp at the points' median: z axis = approach direction, either against the local surface normal
    (smallest principal axis of `points: [P, 3]`, facing the camera) or straight down ("top_down")."""
    center = np.median(points, axis=0)
    if mode == "top_down" or len(points) < 3:
        approach = np.array([0.0, 0.0, -1.0])
    else:
        _, _, vt = np.linalg.svd(points - points.mean(axis=0), full_matrices=False)
        normal = vt[-1]
        if np.dot(normal, camera_center - center) < 0:
            normal = -normal
        approach = -normal
    helper = np.array([1.0, 0.0, 0.0]) if abs(approach[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x_axis = np.cross(helper, approach)
    x_axis /= np.linalg.norm(x_axis)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([x_axis, np.cross(approach, x_axis), approach], axis=1)
    pose[:3, 3] = center
    return pose
