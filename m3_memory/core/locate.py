"""Text → 3D target in a trained memory: render from a view, decode, score, lift the best region with depth.

Also the direct 3D query: decode every Gaussian's own principal query and rank Gaussians, without rendering.
"""
from __future__ import annotations

from dataclasses import dataclass

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
# Proposals of several views closer than this are taken to be the same object.
CONSENSUS_RADIUS_M = 0.08


def render_features(memory: Memory, model: str, c2w: np.ndarray, K: np.ndarray, width: int, height: int):
    """Decoded features `[H, W, d]`, expected depth `[H, W]` and alpha `[H, W]` of one view (`c2w: [4, 4]`)."""
    device = memory.gaussians.params["means"].device
    with torch.no_grad():
        out = memory.gaussians.render(torch.as_tensor(c2w, dtype=torch.float32, device=device)[None],
                                      torch.as_tensor(K, dtype=torch.float32, device=device)[None], width, height)
        queries = out["queries"][0, ..., memory.gaussians.query_slice(model)]
        decoded = memory.attentions[model].decode_map(queries)
    return decoded, out["depth"][0, ..., 0].cpu().numpy(), out["alpha"][0, ..., 0].cpu().numpy()


def search_views(memory: Memory, max_views: int = 8, toward: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Up to `max_views` of the memory's training cameras: `(c2ws [V, 4, 4], Ks [V, 3, 3])`. With `toward: [3]` (a world
    point, e.g. the direct 3D answer) the nearest cameras that see it in frame; otherwise (or when none does) cameras
    evenly spread over the scan. Each searched view costs a render and a decode, so a query without a view of its own
    looks from these few."""
    views = memory.views
    c2ws, Ks = np.asarray(views["c2w"]), np.asarray(views["K"])
    if toward is not None:
        cam = np.linalg.inv(c2ws)[:, :3] @ np.append(toward, 1.0)   # [V, 3] in each camera frame
        z = cam[:, 2]
        uv = np.einsum("vij,vj->vi", Ks, cam)[:, :2] / np.maximum(z, 1e-6)[:, None]
        seen = (z > 0.05) & (uv[:, 0] >= 0) & (uv[:, 0] < views["width"]) & (uv[:, 1] >= 0) & (uv[:, 1] < views["height"])
        if seen.any():
            picks = np.flatnonzero(seen)[np.argsort(z[seen])[:max_views]]
            return c2ws[picks], Ks[picks]
    picks = np.unique(np.linspace(0, len(c2ws) - 1, max_views).round().astype(int))
    return c2ws[picks], Ks[picks]


@dataclass
class MemoryAnswer:
    """A query answered from the whole memory: `result` holds the target (`point` = the direct 3D answer) with the grasp
    orientation, score and heatmap of the rendered search; `rendered_point: [3]` is what rendering alone found."""
    result: LocateResult
    rendered_point: np.ndarray | None


def locate_in_memory(memory: Memory, text: Tensor, model: str = "clip", max_views: int = 8, **options) -> MemoryAnswer:
    """A query with no view of its own. The direct 3D query ranks every Gaussian of the scene, so it is the target; the
    training views that see it are then rendered (`locate`) for what only an image gives: the visible surface, the grasp
    approach along its normal, a heatmap. Where no view confirms it, a top-down grasp at the 3D answer."""
    scores = gaussian_scores(memory, text, model)  # once: the direct query and the object centre both rank by them
    direct, score = locate_gaussians(memory, text, model=model, scores=scores)
    c2ws, Ks = search_views(memory, max_views, toward=direct)
    views = memory.views
    try:
        result = locate(memory, text, c2ws, Ks, views["width"], views["height"], model=model, scores=scores, **options)
        rendered = result.point.copy()
    except QueryError:
        blank = np.zeros((views["height"], views["width"]))
        result = LocateResult(direct, grasp_pose(direct[None], direct, "top_down"), score, blank, blank > 0, -1)
        rendered = None
    result.point = direct
    result.grasp[:3, 3] = direct
    return MemoryAnswer(result, rendered)


def locate(memory: Memory, text: Tensor, c2ws: np.ndarray, Ks: np.ndarray, width: int, height: int,
           model: str = "clip", method: str = "otsu", negatives: Tensor | None = None,
           depths: np.ndarray | None = None, grasp_mode: str = "normal", min_alpha: float = 0.5,
           scores: Tensor | None = None) -> LocateResult:
    """Find `text: [d]` (the model's text embedding) seen from views `c2ws: [V, 4, 4]`, `Ks: [V, 3, 3]`.
    `depths: [V, H, W]` metres replaces the rendered expected depth (a live depth camera); `scores: [N]` are the
    Gaussians' `gaussian_scores` for `text` when the caller already has them.

    Each view proposes its best region; with several views the answer is the proposal that most other views agree with
    (summed scores of the proposals within CONSENSUS_RADIUS_M of it), then the best-scoring view of that cluster: one
    view where another object happens to score high cannot outvote the views that see the right one."""
    if model not in memory.attentions:
        raise QueryError(f"this memory holds no {model!r} features (it has {memory.models})")
    proposals: list[LocateResult] = []
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
        points = backproject(mask, depth, K, c2w)
        grasp = grasp_pose(points, c2w[:3, 3], grasp_mode)
        proposals.append(LocateResult(grasp[:3, 3].copy(), grasp, float(score[mask].mean()), score, mask, index))
    if not proposals:
        raise QueryError("the query matched no confident region in any view: look at the object or rephrase")
    points = np.stack([p.point for p in proposals])
    proposal_scores = np.array([p.score for p in proposals])
    near = np.linalg.norm(points[:, None] - points[None], axis=-1) < CONSENSUS_RADIUS_M
    support = near.astype(float) @ proposal_scores
    cluster = near[int(np.argmax(support))]
    best = max((p for p, keep in zip(proposals, cluster) if keep), key=lambda p: p.score)
    best.point = object_center(memory, text, model, best.point, scores)
    best.grasp[:3, 3] = best.point
    return best


def object_center(memory: Memory, text: Tensor, model: str, surface_point: np.ndarray,
                  scores: Tensor | None = None) -> np.ndarray:
    """The object's centre rather than the seen surface: a view sees only the near side, so average the Gaussians near
    `surface_point: [3]` whose own decoded query matches `text` (they cover every side the memory was trained on)."""
    means = memory.gaussians.params["means"].detach()
    opacity = torch.sigmoid(memory.gaussians.params["opacities"].detach())
    near = ((means - torch.as_tensor(surface_point, dtype=means.dtype, device=means.device)).norm(dim=1)
            < OBJECT_RADIUS_M) & (opacity > 0.1)
    if int(near.sum()) < MIN_REGION_PIXELS:
        return surface_point
    if scores is None:
        scores = gaussian_scores(memory, text, model)
    scores = scores[near].cpu().numpy()
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


def locate_gaussians(memory: Memory, text: Tensor, model: str = "clip", top_k: int = 200,
                     scores: Tensor | None = None) -> tuple[np.ndarray, float]:
    """Direct 3D query, no rendering and no view: among the `top_k` opaque Gaussians most similar to `text`, the one
    with the most similarity-weighted company within OBJECT_RADIUS_M marks the object (two objects sharing the top
    matches form two clusters, and a median or mean would fall between them); returns the opacity-weighted mean of the
    matches around it and their mean similarity."""
    if scores is None:
        scores = gaussian_scores(memory, text, model)
    opacity = torch.sigmoid(memory.gaussians.params["opacities"].detach())
    ranked = torch.topk(torch.where(opacity > 0.1, scores, torch.full_like(scores, -2.0)), min(top_k, len(scores))).indices
    means = memory.gaussians.params["means"].detach()[ranked]
    near = torch.cdist(means, means) < OBJECT_RADIUS_M                           # [k, k]
    support = near.float() @ (scores[ranked].clamp(min=0) * opacity[ranked])
    close = near[int(torch.argmax(support))]
    weights = opacity[ranked][close]
    point = (means[close] * weights[:, None]).sum(0) / weights.sum()
    return point.cpu().numpy(), float(scores[ranked][close].mean())


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
