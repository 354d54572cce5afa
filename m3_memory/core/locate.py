"""Text → 3D target in a trained memory: render from a view, decode, score, lift the best region with depth.

Also the direct 3D query: decode every Gaussian's own principal query and rank Gaussians, without rendering.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from m3_memory.core.checkpoint import Memory
from m3_memory.core.errors import M3Error, QueryError
from m3_memory.core.query import LocateResult, backproject, grasp_pose, otsu_threshold, score_pixels, select_region

MIN_REGION_PIXELS = 4
# Gaussians within this distance of the seen surface may belong to the object (tabletop objects are < 30 cm across).
OBJECT_RADIUS_M = 0.15


def render_features(memory: Memory, model: str, c2w: np.ndarray, K: np.ndarray, width: int, height: int):
    """Decoded features `[H, W, d]`, expected depth `[H, W]` and alpha `[H, W]` of one view (`c2w: [4, 4]`)."""
    device = memory.gaussians.params["means"].device
    with torch.no_grad():
        out = memory.gaussians.render(torch.as_tensor(c2w, dtype=torch.float32, device=device)[None],
                                      torch.as_tensor(K, dtype=torch.float32, device=device)[None], width, height)
        queries = out["queries"][0, ..., memory.gaussians.query_slice(model)]
        decoded = memory.attentions[model].decode_map(queries)
    return decoded, out["depth"][0, ..., 0].cpu().numpy(), out["alpha"][0, ..., 0].cpu().numpy()


def locate(memory: Memory, text: Tensor, c2ws: np.ndarray, Ks: np.ndarray, width: int, height: int,
           model: str = "clip", method: str = "otsu", negatives: Tensor | None = None,
           depths: np.ndarray | None = None, grasp_mode: str = "normal", min_alpha: float = 0.5) -> LocateResult:
    """Find `text: [d]` (the model's text embedding) seen from views `c2ws: [V, 4, 4]`, `Ks: [V, 3, 3]`; the view whose
    region scores best wins. `depths: [V, H, W]` metres replaces the rendered expected depth (a live depth camera)."""
    if model not in memory.attentions:
        raise QueryError(f"this memory holds no {model!r} features (it has {memory.models})")
    best: LocateResult | None = None
    for index, (c2w, K) in enumerate(zip(c2ws, Ks)):
        decoded, rendered_depth, alpha = render_features(memory, model, c2w, K, width, height)
        device = decoded.device
        score = score_pixels(decoded.reshape(-1, decoded.shape[-1]), text.to(device),
                             None if negatives is None else negatives.to(device), method).reshape(height, width)
        score = score.cpu().numpy()
        depth = rendered_depth if depths is None else depths[index]
        mask = select_region(score, (alpha > min_alpha) & (depth > 0), method)
        if mask.sum() < MIN_REGION_PIXELS:
            continue
        region_score = float(score[mask].mean())
        if best is not None and region_score <= best.score:
            continue
        points = backproject(mask, depth, K, c2w)
        grasp = grasp_pose(points, c2w[:3, 3], grasp_mode)
        best = LocateResult(grasp[:3, 3].copy(), grasp, region_score, score, mask, index)
    if best is None:
        raise QueryError("the query matched no confident region in any view: look at the object or rephrase")
    best.point = object_center(memory, text, model, best.point)
    best.grasp[:3, 3] = best.point
    return best


def object_center(memory: Memory, text: Tensor, model: str, surface_point: np.ndarray) -> np.ndarray:
    """The object's centre rather than the seen surface: a view sees only the near side, so average the Gaussians near
    `surface_point: [3]` whose own decoded query matches `text` (they cover every side the memory was trained on)."""
    means = memory.gaussians.params["means"].detach()
    opacity = torch.sigmoid(memory.gaussians.params["opacities"].detach())
    near = ((means - torch.as_tensor(surface_point, dtype=means.dtype, device=means.device)).norm(dim=1)
            < OBJECT_RADIUS_M) & (opacity > 0.1)
    if int(near.sum()) < MIN_REGION_PIXELS:
        return surface_point
    scores = gaussian_scores(memory, text, model)[near].cpu().numpy()
    selected = torch.from_numpy(scores > otsu_threshold(scores)).to(means.device)
    if int(selected.sum()) < MIN_REGION_PIXELS:
        return surface_point
    weights = opacity[near][selected]
    return ((means[near][selected] * weights[:, None]).sum(0) / weights.sum()).cpu().numpy()


def gaussian_scores(memory: Memory, text: Tensor, model: str = "clip", chunk: int = 65536) -> Tensor:
    """Cosine similarity `[N]` of every Gaussian's decoded principal query to `text: [d]`."""
    queries = memory.gaussians.params["queries"].detach()[:, memory.gaussians.query_slice(model)]
    target = F.normalize(text.to(queries.device), dim=-1)
    with torch.no_grad():
        return torch.cat([F.normalize(memory.attentions[model](queries[s:s + chunk]), dim=-1) @ target
                          for s in range(0, len(queries), chunk)])


def locate_gaussians(memory: Memory, text: Tensor, model: str = "clip", top_k: int = 200) -> tuple[np.ndarray, float]:
    """Direct 3D query, no rendering and no view: the `top_k` opaque Gaussians most similar to `text`, reduced to the
    opacity-weighted mean of those within OBJECT_RADIUS_M of their median (stray matches elsewhere do not pull it);
    returns that point and their mean similarity."""
    scores = gaussian_scores(memory, text, model)
    opacity = torch.sigmoid(memory.gaussians.params["opacities"].detach())
    ranked = torch.topk(torch.where(opacity > 0.1, scores, torch.full_like(scores, -2.0)), min(top_k, len(scores))).indices
    means = memory.gaussians.params["means"].detach()[ranked]
    close = (means - means.median(dim=0).values).norm(dim=1) < OBJECT_RADIUS_M
    if not bool(close.any()):
        close = torch.ones_like(close)
    weights = opacity[ranked][close]
    point = (means[close] * weights[:, None]).sum(0) / weights.sum()
    return point.cpu().numpy(), float(scores[ranked].mean())


def text_encoder(memory, model: str):
    """The extractor whose feature space `model`'s slice of `memory` was trained in (weights hash checked)."""
    from m3_memory.core.features.registry import build_extractor

    if model not in memory.identities:
        raise M3Error(f"this memory holds no {model!r} features (it has {memory.models})")
    extractor = build_extractor(memory.identities[model]["name"])
    if extractor.identity.to_json() != memory.identities[model]:
        raise M3Error(f"the installed {model!r} model ({extractor.identity.key}) is not the one this memory was "
                      f"trained with ({memory.identities[model]}): decoding would mix feature spaces")
    return extractor
