"""The one text-query path: phrase → instances, target, grasp and heatmap. The memory server, `m3 query`, evaluation,
the viewer and the benchmarks all call `QueryEngine.answer`.

What does not depend on the text is done once, when the engine is built: every Gaussian's principal query is decoded
through the model's decoder (memory attention or the baseline's MLP) into a unit feature `[N, d]`, the text encoder is
loaded and the canonical negatives are encoded. A query then costs one text embedding, one `[N, d] @ [d]` product and
a few one-channel renders.

Scoring. Per Gaussian, `otsu` maps cosine similarity to [0, 1] ((cos + 1) / 2, the paper thresholds it with Otsu);
`relevancy` is LERF's (the phrase against each canonical negative). Views are scored either from the per-Gaussian
scores blended like colour (`render="scores"`, fast) or as in the paper (`render="features"`: render the principal
queries, decode every pixel, score pixels).

Answers. The direct 3D query ranks all Gaussians: clusters of the best matches are the instances, the first is the
target when no view is given; the training views that see it are rendered for the grasp approach and the heatmap. With
a view, the view's best region (by peak score, not area) gives the target, and its distance to the whole-memory answer
is reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from m3_memory.core.errors import M3Error, QueryError
from m3_memory.core.query import (
    CANONICAL_NEGATIVES,
    DEFAULT_MAX_QUERY_CHARS,
    backproject,
    grasp_pose,
    otsu_threshold,
    relevancy_from_cosines,
    score_pixels,
    select_region,
    select_regions,
    small_mode_threshold,
    validate_query,
)
from m3_memory.core.views import Camera, RenderedView, render_memory, render_values

MIN_REGION_PIXELS = 4
# Gaussians within this distance of a match may belong to the same object (tabletop objects are < 30 cm across).
OBJECT_RADIUS_M = 0.15
# Answers closer than this are taken to be the same object.
CONSENSUS_RADIUS_M = 0.08
# A Gaussian this transparent is no surface.
MIN_OPACITY = 0.1
# Otsu is re-applied over the Gaussians' scores until at most this fraction matches: one object of a tabletop scene is
# a few percent of its Gaussians (at 25%, as for pixels of a view, table and floor matched "yellow bath duck").
MATCH_FRACTION = 0.05
# Best matches ranked per instance asked for (the direct 3D query's pool).
CANDIDATES_PER_INSTANCE = 200


@dataclass
class QueryOptions:
    """How a query is answered; the defaults are the memory server's (config/ files only override them)."""
    method: str = "otsu"                 # "otsu" | "relevancy" (LERF, against `negatives`)
    render: str = "scores"               # "scores": blend per-Gaussian scores | "features": the paper's per-pixel decode
    grasp_mode: str = "normal"           # "normal": against the seen surface | "top_down"
    max_instances: int = 1               # instances returned (the first is the target)
    max_search_views: int = 4            # training views rendered when no view is given
    min_alpha: float = 0.5               # rendered opacity a pixel needs to count as surface
    heatmap_scale: float = 1.0           # render views at this fraction of their resolution
    min_relevancy: float = 0.51          # the target must beat every canonical negative, by a margin (0: no check)
    max_query_chars: int = DEFAULT_MAX_QUERY_CHARS
    negatives: tuple[str, ...] = CANONICAL_NEGATIVES

    def __post_init__(self):
        choices = {"method": ("otsu", "relevancy"), "render": ("scores", "features"),
                   "grasp_mode": ("normal", "top_down")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise QueryError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 1 <= int(self.max_instances) <= 64:
            raise QueryError(f"max_instances must be 1..64, got {self.max_instances}")
        if not 1 <= int(self.max_search_views) <= 64:
            raise QueryError(f"max_search_views must be 1..64, got {self.max_search_views}")
        if not 0.05 <= float(self.heatmap_scale) <= 1.0:
            raise QueryError(f"heatmap_scale must be in [0.05, 1], got {self.heatmap_scale}")
        self.negatives = tuple(self.negatives)
        if self.method == "relevancy" and not self.negatives:
            raise QueryError("relevancy scoring needs negative phrases")


@dataclass
class Instance:
    """One object that matches: `point: [3]` world, `extent: [3]` axis-aligned size (m) of its matching Gaussians,
    `score` in [0, 1], `views_seen` training views that have it in frame, `gaussians: [M]` indices of its Gaussians."""
    point: np.ndarray
    extent: np.ndarray
    score: float
    relevancy: float
    views_seen: int
    gaussians: np.ndarray


@dataclass
class Answer:
    """A query's answer, world frame. `point: [3]` the target, `grasp: [4, 4]` (approach = its z axis), `instances`
    best first (the target's is first). `gaussian_scores: [N]` and `threshold` say which Gaussians match. `heatmap: [H,
    W]` and `mask: [H, W]` belong to `heatmap_camera`, described by `heatmap_source`; `rendered_point: [3]` is what the
    rendered views alone found (None when no view found a region)."""
    query: str
    point: np.ndarray
    grasp: np.ndarray
    score: float
    instances: list[Instance]
    gaussian_scores: np.ndarray
    threshold: float
    heatmap: np.ndarray | None = None
    mask: np.ndarray | None = None
    heatmap_camera: Camera | None = None
    heatmap_source: str = ""
    heatmap_view: int = -1               # index of the training view the heatmap comes from; -1 for a given view
    rendered_point: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


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


class QueryEngine:
    """Answers text queries against one model of one memory. `encoder` (an extractor with `encode_text`, or a function:
    phrases [T] → embeddings [T, d]) defaults to the memory's own extractor; `chunk` Gaussians are decoded at a time when the engine is built."""

    def __init__(self, memory, model: str | None = None, encoder=None, chunk: int = 32768):
        self.memory = memory
        self.model = model or memory.models[0]
        if self.model not in memory.attentions:
            raise QueryError(f"this memory holds no {self.model!r} features (it has {memory.models})")
        encoder = encoder if encoder is not None else text_encoder(memory, self.model)
        self.encode_text = getattr(encoder, "encode_text", encoder)
        self.views = memory.views
        if len(self.views) == 0:
            raise M3Error("the memory has no training views to search")
        queries = memory.gaussians.queries(self.model)
        decoder = memory.attentions[self.model]
        with torch.no_grad():
            self.features = torch.cat([F.normalize(decoder(queries[s:s + chunk]), dim=-1)
                                       for s in range(0, len(queries), chunk)])          # [N, d]
        self.means = memory.gaussians.means                                                # [N, 3]
        self.opacity = memory.gaussians.opacity                                            # [N]
        self._negatives: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}
        self.negatives(CANONICAL_NEGATIVES)  # loads the text encoder now, not on the first query

    # --- text-dependent work -------------------------------------------------------------------------------------
    def encode(self, phrases: list[str]) -> Tensor:
        """Unit text embeddings `[T, d]` on the memory's device."""
        return F.normalize(self.encode_text(list(phrases)).float(), dim=-1).to(self.features.device)

    def negatives(self, phrases: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        """Embeddings `[k, d]` of negative phrases and every Gaussian's cosine `[N, k]` to them (cached per set)."""
        if phrases not in self._negatives:
            embeddings = self.encode(list(phrases))
            self._negatives[phrases] = embeddings, self.features @ embeddings.T
        return self._negatives[phrases]

    def cosines(self, text: Tensor) -> Tensor:
        """Cosine similarity `[N]` of every Gaussian's decoded feature to `text: [d]`."""
        return self.features @ F.normalize(text.float().to(self.features.device), dim=-1)

    def scores(self, cosines: Tensor, options: QueryOptions) -> Tensor:
        """Per-Gaussian score `[N]` in [0, 1] for `options.method`."""
        if options.method == "relevancy":
            return relevancy_from_cosines(cosines, self.negatives(options.negatives)[1])
        return (cosines + 1) / 2

    # --- the entry point -------------------------------------------------------------------------------------------
    def answer(self, query: str, view: Camera | None = None, options: QueryOptions | None = None,
               text: Tensor | None = None) -> Answer:
        """Answer `query` looking from `view` (None: search the whole memory). `text: [d]` replaces encoding the
        query (a benchmark's cached embedding). Raises QueryError when the query is malformed or nothing matches."""
        options = options or QueryOptions()
        query = validate_query(query, options.max_query_chars)
        if text is None:
            text = self.encode([query])[0]
        cosines = self.cosines(text)
        scores = self.scores(cosines, options)
        relevancies = relevancy_from_cosines(cosines, self.negatives(CANONICAL_NEGATIVES)[1])   # the meaning floor's
        threshold = self.gaussian_threshold(scores)
        # with a view, a few more instances than asked for: the view's answer is checked against them
        found = self.instances(scores, relevancies, threshold, max(options.max_instances, 4 * (view is not None)))
        instances = found[:options.max_instances]
        best = instances[0]
        if best.relevancy < options.min_relevancy:
            raise QueryError(f"nothing in the memory matches {query!r}: its best match (score {best.score:.2f}) does "
                             f"not beat generic phrases such as {CANONICAL_NEGATIVES[0]!r}; rephrase or name an "
                             "object that was scanned")
        answer = Answer(query, best.point.copy(), np.eye(4), best.score, instances,
                        scores.cpu().numpy(), threshold)
        if view is None:
            self._search_memory(answer, text, scores, options)
        else:
            self._from_view(answer, view, text, scores, options, np.stack([i.point for i in found]))
        return answer

    # --- pieces ----------------------------------------------------------------------------------------------------
    def gaussian_threshold(self, scores: Tensor) -> float:
        """Score above which an opaque Gaussian matches: Otsu over the opaque Gaussians' scores, re-applied while more
        than MATCH_FRACTION of them is above it (a small object is a tiny mode beside a spread-out background)."""
        values = scores[self.opacity > MIN_OPACITY].cpu().numpy()
        return small_mode_threshold(values, MATCH_FRACTION) if values.size else 1.0

    def instances(self, scores: Tensor, relevancies: Tensor, threshold: float, count: int) -> list[Instance]:
        """Up to `count` objects, best first. Among the best-scoring opaque Gaussians, the one with the most
        score-weighted company within OBJECT_RADIUS_M marks an object (two objects sharing the matches form two
        clusters, where a mean would fall between them); its cluster's opacity-weighted mean is the object's point.
        The first is always returned; later ones only when their score clears `threshold`."""
        opaque = self.opacity > MIN_OPACITY
        pool = min(CANDIDATES_PER_INSTANCE * count, len(scores))
        ranked = torch.topk(torch.where(opaque, scores, torch.full_like(scores, -2.0)), pool).indices
        means, weight = self.means[ranked], scores[ranked].clamp(min=0) * self.opacity[ranked]
        near = torch.cdist(means, means) < OBJECT_RADIUS_M                                   # [k, k]
        remaining = torch.ones(len(ranked), dtype=torch.bool, device=means.device)
        found: list[Instance] = []
        for attempt in range(count):
            # the j-th search looks at the best 200·(j+1) matches, so the first answer does not depend on `count`
            pool_j = remaining.clone()
            pool_j[CANDIDATES_PER_INSTANCE * (attempt + 1):] = False
            if int(pool_j.sum()) < MIN_REGION_PIXELS:
                break
            support = near[:, pool_j].float() @ weight[pool_j]
            seed = int(torch.argmax(torch.where(pool_j, support, torch.full_like(support, -1.0))))
            members = near[seed] & pool_j
            remaining &= ~members
            w = self.opacity[ranked][members]
            point = ((means[members] * w[:, None]).sum(0) / w.sum()).cpu().numpy()
            score = float(scores[ranked][members].mean())
            if found and (score <= threshold or int(members.sum()) < MIN_REGION_PIXELS or any(
                    np.linalg.norm(point - other.point) < CONSENSUS_RADIUS_M for other in found)):
                continue
            found.append(self._instance(point, score, float(relevancies[ranked][members].mean()), scores, threshold))
        return found

    def _instance(self, point: np.ndarray, score: float, relevancy_: float, scores: Tensor,
                  threshold: float) -> Instance:
        near = ((self.means - torch.as_tensor(point, dtype=self.means.dtype, device=self.means.device)).norm(dim=1)
                < OBJECT_RADIUS_M) & (self.opacity > MIN_OPACITY) & (scores > threshold)
        members = torch.nonzero(near).flatten().cpu().numpy()
        if len(members) >= MIN_REGION_PIXELS:
            xyz = self.means[members].cpu().numpy()
            extent = np.percentile(xyz, 95, axis=0) - np.percentile(xyz, 5, axis=0)
        else:
            extent = np.zeros(3)
        return Instance(point, extent, score, relevancy_, int(self.seen_by(point).sum()), members)

    def seen_by(self, point: np.ndarray) -> np.ndarray:
        """`[V]` bool: training views with `point: [3]` in frame (in front of the camera, inside the image)."""
        cam = np.einsum("vji,vj->vi", self.views.c2w[:, :3, :3], point - self.views.c2w[:, :3, 3])   # R^T (p - t)
        z = cam[:, 2]
        uv = np.einsum("vij,vj->vi", self.views.K, cam)[:, :2] / np.maximum(z, 1e-6)[:, None]
        return ((z > 0.05) & (uv[:, 0] >= 0) & (uv[:, 0] < self.views.width) & (uv[:, 1] >= 0)
                & (uv[:, 1] < self.views.height))

    def search_views(self, toward: np.ndarray, count: int) -> list[int]:
        """Up to `count` training views that have `toward: [3]` in frame, nearest first; evenly spread views when
        none does."""
        seen = self.seen_by(toward)
        if seen.any():
            distance = np.linalg.norm(self.views.c2w[:, :3, 3] - toward, axis=1)
            return np.flatnonzero(seen)[np.argsort(distance[seen])[:count]].tolist()
        return np.unique(np.linspace(0, len(self.views) - 1, count).round().astype(int)).tolist()

    def heatmap(self, camera: Camera, text: Tensor, scores: Tensor, options: QueryOptions) -> RenderedView:
        """Render `camera` (at `options.heatmap_scale`) with `values: [H, W, 1]` = the per-pixel score in [0, 1]."""
        camera = camera.scaled(options.heatmap_scale)
        if options.render == "features":
            view = render_memory(self.memory, camera, [self.model], rgb=False)
            decoded = view.features.pop(self.model)
            negatives = self.negatives(options.negatives)[0] if options.method == "relevancy" else None
            view.values = score_pixels(decoded.reshape(-1, decoded.shape[-1]), text.to(decoded.device), negatives,
                                       options.method).reshape(camera.height, camera.width, 1)
            return view
        view = render_values(self.memory, camera, scores[:, None])
        view.values = view.values / view.alpha[..., None].clamp_min(1e-6)   # blended score, not premultiplied
        return view

    def region(self, view: RenderedView, options: QueryOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The view's best region: `(score [H, W], mask [H, W], world points [P, 3])` (points empty without one)."""
        score = view.values[..., 0].cpu().numpy()
        depth = view.depth.cpu().numpy()
        mask = select_region(score, (view.alpha.cpu().numpy() > options.min_alpha) & (depth > 0), options.method)
        if mask.sum() < MIN_REGION_PIXELS:
            return score, mask, np.zeros((0, 3))
        return score, mask, backproject(mask, depth, view.camera.K, view.camera.c2w)

    def object_center(self, surface: np.ndarray, scores: Tensor) -> np.ndarray:
        """A view sees only the near side: the opacity-weighted mean of the matching Gaussians near `surface: [3]`
        (they cover every side the memory was trained on), or `surface` itself when too few match."""
        near = ((self.means - torch.as_tensor(surface, dtype=self.means.dtype, device=self.means.device)).norm(dim=1)
                < OBJECT_RADIUS_M) & (self.opacity > MIN_OPACITY)
        if int(near.sum()) < MIN_REGION_PIXELS:
            return surface
        local = scores[near].cpu().numpy()
        selected = torch.from_numpy(local > otsu_threshold(local)).to(self.means.device)
        if int(selected.sum()) < MIN_REGION_PIXELS:
            return surface
        weights = self.opacity[near][selected]
        return ((self.means[near][selected] * weights[:, None]).sum(0) / weights.sum()).cpu().numpy()

    def _from_view(self, answer: Answer, view: Camera, text: Tensor, scores: Tensor, options: QueryOptions,
                   known: np.ndarray, candidates: int = 5) -> None:
        """The view's answer, checked against the whole memory: of the view's `candidates` best regions (by peak), the
        first whose object lies within OBJECT_RADIUS_M of a whole-memory instance (`known: [k, 3]`); the best region when none does (the
        message then says how far it is from the whole-memory answer)."""
        rendered = self.heatmap(view, text, scores, options)
        score = rendered.values[..., 0].cpu().numpy()
        depth = rendered.depth.cpu().numpy()
        regions = select_regions(score, (rendered.alpha.cpu().numpy() > options.min_alpha) & (depth > 0),
                                 options.method)[:candidates]
        regions = [m for m in regions if m.sum() >= MIN_REGION_PIXELS]
        if not regions:
            answer.notes.append("nothing confident in the view; answered from the whole memory")
            self._search_memory(answer, text, scores, options)
            return
        proposals = []
        for mask in regions:
            grasp = grasp_pose(backproject(mask, depth, view.K, view.c2w), view.center, options.grasp_mode)
            proposals.append((mask, grasp, self.object_center(grasp[:3, 3], scores)))
        # the region of the best whole-memory instance, else of another instance, else the view's best
        distance = np.array([[np.linalg.norm(p[2] - k) for k in known] for p in proposals])       # [regions, k]
        agrees = distance < OBJECT_RADIUS_M
        pick = 0
        for instance in range(len(known)):
            if agrees[:, instance].any():
                pick = int(np.argmax(agrees[:, instance]))
                break
        mask, grasp, answer.point = proposals[pick]
        answer.rendered_point = answer.point.copy()
        grasp[:3, 3] = answer.point
        answer.grasp, answer.score = grasp, float(score[mask].mean())
        answer.heatmap, answer.mask, answer.heatmap_camera = score, mask, rendered.camera
        answer.heatmap_source = "the given view"
        gap = float(np.linalg.norm(known - answer.point, axis=1).min())
        if gap > OBJECT_RADIUS_M:
            answer.notes.append(f"the view's answer is {gap:.2f} m from every whole-memory answer (best at "
                                f"{np.round(answer.instances[0].point, 3).tolist()})")

    def _search_memory(self, answer: Answer, text: Tensor, scores: Tensor, options: QueryOptions) -> None:
        """No view: the target is the first instance; the training views that see it give the grasp approach along the
        seen surface and the heatmap (the proposal nearest the target; a top-down grasp when none is near)."""
        target = answer.instances[0].point
        proposals = []
        for index in self.search_views(target, options.max_search_views):
            rendered = self.heatmap(self.views.camera(index), text, scores, options)
            score, mask, points = self.region(rendered, options)
            if len(points):
                proposals.append((index, rendered, score, mask, points, np.median(points, axis=0)))
        answer.point, answer.grasp = target.copy(), grasp_pose(target[None], target, "top_down")
        answer.heatmap_source = "no training view (the target is in none of them)"
        if not proposals:
            return
        surfaces = np.stack([p[5] for p in proposals])
        weights = np.array([float(p[2][p[3]].mean()) for p in proposals])
        near = np.linalg.norm(surfaces[:, None] - surfaces[None], axis=-1) < CONSENSUS_RADIUS_M
        agreed = near[int(np.argmax(near.astype(float) @ weights))]      # the proposal most other views agree with
        answer.rendered_point = self.object_center(surfaces[agreed][np.argmax(weights[agreed])], scores)
        distance = np.linalg.norm(surfaces - target, axis=1)
        pick = int(np.argmin(distance))
        index, rendered, score, mask, points, _ = proposals[pick]
        answer.heatmap, answer.mask, answer.heatmap_camera = score, mask, rendered.camera
        answer.heatmap_view, answer.heatmap_source = index, f"training view {index}"
        if distance[pick] < OBJECT_RADIUS_M:
            answer.grasp = grasp_pose(points, rendered.camera.center, options.grasp_mode)
            answer.grasp[:3, 3] = target
