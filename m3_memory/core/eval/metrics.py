"""Metric functions of the evaluation (paper Tables 1-2): feature fidelity, mask IoUs, retrieval recall."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def feature_fidelity(decoded: Tensor, raw: Tensor) -> tuple[float, float, int]:
    """Mean cosine distance (1 − cos) and mean L2 between `decoded, raw: [P, d]` over the rows where `raw` is not all
    zero (no feature there, as in the training loss); returns (cosine distance, L2, rows used)."""
    valid = raw.abs().sum(dim=1) > 0
    decoded, raw = decoded[valid], raw[valid]
    if len(raw) == 0:
        return float("nan"), float("nan"), 0
    cosine = 1 - F.cosine_similarity(decoded, raw, dim=1)
    l2 = (decoded - raw).norm(dim=1)
    return float(cosine.mean()), float(l2.mean()), int(len(raw))


def mask_overlap(predicted: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """(intersection, union) pixel counts of boolean masks `predicted, truth: [H, W]`."""
    return int((predicted & truth).sum()), int((predicted | truth).sum())


def grounding_summary(intersections: Sequence[int], unions: Sequence[int],
                      thresholds: Sequence[float] = (0.5, 0.6)) -> dict:
    """Over (query, view) pairs: mIoU (mean of per-pair IoU), cIoU (Σ intersections / Σ unions) and precision at each
    IoU threshold (`p50` = fraction of pairs with IoU ≥ 0.5, the paper's AP50)."""
    inter, union = np.asarray(intersections, dtype=np.float64), np.asarray(unions, dtype=np.float64)
    if len(inter) == 0:
        return {"pairs": 0}
    iou = inter / np.maximum(union, 1)
    summary = {"pairs": len(inter), "miou": float(iou.mean()), "ciou": float(inter.sum() / max(union.sum(), 1))}
    summary.update({f"p{round(t * 100)}": float((iou >= t).mean()) for t in thresholds})
    return summary


def recall_at_k(similarity: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k of `similarity: [Q, C]` (query × candidate) where `positives: [Q, C]` bool marks the right candidates:
    the fraction of queries whose best-ranked right candidate is among their top k (`r1`, `r5`, ...)."""
    if similarity.shape[0] == 0:
        return {f"r{k}": float("nan") for k in ks}
    order = similarity.argsort(dim=1, descending=True)
    hits = torch.gather(positives, 1, order)                                  # [Q, C], in rank order
    first = torch.where(hits.any(dim=1), hits.float().argmax(dim=1), torch.full_like(order[:, 0], hits.shape[1]))
    return {f"r{k}": float((first < k).float().mean()) for k in ks}
