"""Evaluate a trained memory on its held-out views (paper §4: Tables 1-2, our notes "Evaluation in the paper").

Any memory whose `gaussians` render colour and latents and whose `attentions[model]` decode them
(`forward: [P, l] → [P, d]`, `decode_map: [H, W, l] → [H, W, d]`) is evaluated alike: M3's memory attention and the
distillation baseline's MLP (`FeatureDecoder`, trained by `m3_memory.core.distill`). Views are rendered and decoded by
`views.render_memory`, the query engine's own path.

Sections of the report (a JSON-able dict):
- rgb: PSNR and SSIM of the rendered held-out views.
- features: per model, cosine distance and L2 between the decoded rendered features and the raw features of the view.
- grounding: per model, each visible object's primary phrase masked on the decoded map (`score_pixels` and
  `select_region`, as the query engine's paper path does) vs its ground-truth mask: mIoU, cIoU, precision at IoU 0.5 / 0.6.
- retrieval: per model, object regions (the decoded features averaged over each visible object's ground-truth mask) vs
  every object phrase plus DISTRACTOR_CAPTIONS: image→text and text→image recall@1/5/10; the same from the raw features
  as the feature model's own ceiling.
- localisation: per model, each object's primary phrase answered as the memory server does without a camera view
  (`QueryEngine.answer`): the direct 3D target, and what rendering `search_views` training views alone found; distance
  to the ground-truth centre and success within `success_radius_m`.
- cost: parameters, bank sizes, Gaussians, training seconds (as the trainer recorded them), render and locate latency.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from m3_memory.core.errors import M3Error
from m3_memory.core.eval.metrics import feature_fidelity, grounding_summary, mask_overlap, recall_at_k
from m3_memory.core.engine import QueryEngine, QueryOptions, text_encoder
from m3_memory.core.errors import QueryError
from m3_memory.core.losses import psnr, ssim
from m3_memory.core.query import CANONICAL_NEGATIVES, score_pixels, select_region
from m3_memory.core.scene import Scene
from m3_memory.core.views import Camera
from m3_memory.core.trainer import ViewFeatures, sample_features, training_views

# Plausible tabletop captions naming none of the demo objects (duck, mug, soccer ball, cat, coffee, rocket, ball, cube):
# retrieval must pick the scene's phrase out of these too.
DISTRACTOR_CAPTIONS = (
    "a stapler", "a pair of scissors", "a blue notebook", "a green apple", "a banana", "a wooden spoon",
    "a laptop computer", "a smartphone", "a pencil", "a glass bottle", "a potted plant", "a tennis racket",
    "a teddy bear", "a toothbrush", "a wrist watch", "a pair of sunglasses", "a bunch of keys", "a computer mouse",
    "a remote control", "a wine glass", "a screwdriver", "a hammer", "a roll of tape", "an orange", "a white candle",
    "a calculator", "a pair of headphones", "a hardcover book", "a kitchen knife", "a metal fork", "a cereal bowl",
    "a vase of flowers", "a folded towel", "a running shoe", "a straw hat", "a black umbrella", "an alarm clock",
    "a power drill", "a chess board", "a game controller",
)

TextEncoder = Callable[[list[str]], Tensor]   # phrases [T] -> embeddings [T, d] in the model's feature space


@dataclass
class EvalConfig:
    method: str = "otsu"                  # pixel scoring for grounding and locate: "otsu" or "relevancy"
    min_alpha: float = 0.5                # rendered opacity a predicted-mask pixel needs (as locate)
    min_object_pixels: int = 20           # an object counts as visible in a view with this many ground-truth pixels
    success_radius_m: float = 0.05
    search_views: int = 4                 # training views rendered per locate (as the memory server without a view)
    iou_thresholds: tuple[float, ...] = (0.5, 0.6)
    recall_ks: tuple[int, ...] = (1, 5, 10)


@dataclass
class GroundTruth:
    """`objects`: objects.json entries (index, name, phrases with the primary one first, center [3] metres);
    `masks[i]`: `[H, W]` uint8 object index of scene view i (0 = background), None where the view has none."""
    objects: list[dict]
    masks: list[np.ndarray | None]

    @property
    def phrases(self) -> list[str]:
        return [obj["phrases"][0] if obj.get("phrases") else obj["name"] for obj in self.objects]


def load_ground_truth(scene: Scene) -> GroundTruth | None:
    """The scene's objects.json and masks/<frame_id>.png (as `m3 demo-scene` writes them); None without objects.json."""
    path = scene.root / "objects.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    objects = data["objects"] if isinstance(data, dict) else data
    masks = []
    for frame in scene.frames:
        mask_path = scene.root / "masks" / f"{frame.frame_id}.png"
        masks.append(np.asarray(Image.open(mask_path)) if mask_path.is_file() else None)
    return GroundTruth(objects, masks)


def held_out_views(n_views: int, holdout_every: int) -> np.ndarray:
    """Views the memory was not trained on; every view when `holdout_every` is 0 (then nothing was held out)."""
    if holdout_every <= 0:
        return np.arange(n_views)
    return np.setdiff1d(np.arange(n_views), training_views(n_views, holdout_every))


def default_text_encoders(memory, notes: list[str]) -> dict[str, TextEncoder]:
    """Each of the memory's models that has a text side, checked to be the extractor it was trained with."""
    encoders = {}
    for model in memory.models:
        try:
            extractor = text_encoder(memory, model)
            extractor.encode_text(["object"])
        except M3Error as exc:
            notes.append(f"{model}: no text queries ({exc}); grounding, retrieval and localisation skipped")
            continue
        encoders[model] = extractor.encode_text
    return encoders


def evaluate(scene: Scene, memory, features: dict[str, ViewFeatures] | None = None,
             text_encoders: dict[str, TextEncoder] | None = None, config: EvalConfig | None = None) -> dict:
    """Report (module docstring) of `memory` on `scene`'s held-out views. `features`: the raw per-view features of the
    scene (the training cache) for fidelity and the retrieval ceiling; `text_encoders`: per model phrases → embeddings
    (default: the extractor the memory was trained with). Sections without their inputs are skipped with a note."""
    config = config or EvalConfig()
    notes: list[str] = []
    device = memory.gaussians.params["means"].device
    n_views = len(scene)
    height, width = scene.meta.height, scene.meta.width
    trained = memory.views
    if (trained.width, trained.height) != (width, height):
        raise M3Error(f"the memory was trained on {trained.width}x{trained.height} views, "
                      f"the scene has {width}x{height}: evaluate it on the scene it was trained on")
    holdout_every = int(memory.config.get("holdout_every", 0))
    views = held_out_views(n_views, holdout_every)
    if holdout_every <= 0:
        notes.append("holdout_every = 0: the memory was trained on every view, so these are training-view numbers, "
                     "not novel-view ones (train with holdout_every = 8 for a held-out evaluation)")
    features = features or {}
    if not features:
        notes.append("no raw features given: feature fidelity and the raw retrieval ceiling skipped")
    truth = load_ground_truth(scene)
    if truth is None:
        notes.append("the scene has no objects.json: grounding, retrieval and localisation skipped")
    if text_encoders is None:
        text_encoders = default_text_encoders(memory, notes) if truth is not None else {}
    text_models = [m for m in memory.models if m in text_encoders and truth is not None]
    texts, negatives = {}, {}
    for model in text_models:
        # [O + distractors, d]: the objects' primary phrases first, so object j's text is row j
        texts[model] = text_encoders[model](truth.phrases + list(DISTRACTOR_CAPTIONS)).float().to(device)
        if config.method == "relevancy":
            negatives[model] = text_encoders[model](list(CANONICAL_NEGATIVES)).float().to(device)

    images = scene.images()
    cameras = {view: Camera(scene.c2w[view], scene.Ks[view], width, height) for view in views}
    memory.render(cameras[views[0]], memory.models)   # warm-up: not timed
    render_ms, psnrs, ssims = [], [], []
    fidelity = {m: [] for m in memory.models if m in features}                     # (cos, l2, rows) per view
    overlaps = {m: [] for m in text_models}                                          # (object j, view, inter, union)
    regions = {m: {"rendered": [], "raw": [], "object": []} for m in text_models}
    for view in views:
        started = time.perf_counter()
        rendered = memory.render(cameras[view], memory.models)
        if device.type == "cuda":
            torch.cuda.synchronize()
        render_ms.append(1e3 * (time.perf_counter() - started))
        target = torch.from_numpy(images[view]).to(device).float()[None] / 255.0
        psnrs.append(psnr(rendered.rgb[None], target))
        ssims.append(float(ssim(rendered.rgb[None].clamp(0, 1), target)))
        valid = rendered.alpha.cpu().numpy() > config.min_alpha
        for model, decoded in rendered.features.items():
            flat = decoded.reshape(-1, decoded.shape[-1])                             # [H·W, d]
            raw = None
            if model in features:
                vs, us = np.divmod(np.arange(height * width), width)
                raw = sample_features(features[model], view, us, vs, width, height).to(device)    # [H·W, d]
                fidelity[model].append(feature_fidelity(flat, raw))
            if model not in text_models or truth.masks[view] is None:
                continue
            for j, obj in enumerate(truth.objects):
                gt = truth.masks[view] == obj["index"]
                if gt.sum() < config.min_object_pixels:
                    continue
                score = score_pixels(flat, texts[model][j], negatives.get(model), config.method)
                predicted = select_region(score.reshape(height, width).cpu().numpy(), valid, config.method)
                overlaps[model].append((j, int(view), *mask_overlap(predicted, gt)))
                pixels = torch.from_numpy(gt.reshape(-1)).to(device)
                regions[model]["rendered"].append(flat[pixels].mean(0))
                regions[model]["object"].append(j)
                if raw is not None:
                    regions[model]["raw"].append(raw[pixels].mean(0))

    report = {
        "method": memory.config.get("method", "m3"),
        "scene": str(scene.root),
        "views": {"total": n_views, "holdout_every": holdout_every, "evaluated": views.tolist(),
                  "held_out": holdout_every > 0, "size": [width, height]},
        "rgb": {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "per_view_psnr": psnrs},
        "features": {m: _pooled_fidelity(rows) for m, rows in fidelity.items()},
        "grounding": {m: _grounding(truth, rows, config) for m, rows in overlaps.items()},
        "retrieval": {m: _retrieval(regions[m], texts[m], len(truth.objects), config) for m in text_models},
        "localisation": {},
        "config": asdict(config),
        "notes": notes,
    }
    locate_ms = []
    for model in text_models:
        engine = QueryEngine(memory, model, text_encoders[model])
        report["localisation"][model] = _localisation(engine, truth, texts[model], config, locate_ms)
    final = memory.config.get("final", {})
    if "train_s" not in final:
        notes.append("the checkpoint does not record its training time: take it from the caller")
    report["cost"] = {
        "parameters": memory.num_parameters(), "gaussians": len(memory.gaussians), "bank_sizes": memory.bank_sizes(),
        "iterations": memory.iteration, "train_s": final.get("train_s"), "device": str(device),
        "render_ms_mean": float(np.mean(render_ms)),
        "locate_ms_mean": float(np.mean(locate_ms)) if locate_ms else None,
        "locate_ms_p95": float(np.percentile(locate_ms, 95)) if locate_ms else None,
        "locate_views": min(config.search_views, len(trained)),
    }
    return report


def _pooled_fidelity(rows: list[tuple[float, float, int]]) -> dict:
    """Per-view (cosine distance, L2, pixels) → pixel-weighted means over the evaluated views."""
    rows = [r for r in rows if r[2] > 0]
    if not rows:
        return {"views": 0}
    weights = np.array([r[2] for r in rows], dtype=np.float64)
    return {"cosine_distance": float(np.average([r[0] for r in rows], weights=weights)),
            "l2": float(np.average([r[1] for r in rows], weights=weights)), "views": len(rows)}


def _grounding(truth: GroundTruth, rows: list[tuple], config: EvalConfig) -> dict:
    summary = grounding_summary([r[2] for r in rows], [r[3] for r in rows], config.iou_thresholds)
    summary["per_object"] = {}
    for j, phrase in enumerate(truth.phrases):
        mine = [r for r in rows if r[0] == j]
        if mine:
            summary["per_object"][phrase] = float(np.mean([r[2] / max(r[3], 1) for r in mine]))
    return summary


def _retrieval(regions: dict, texts: Tensor, n_objects: int, config: EvalConfig) -> dict:
    """Recall of object regions [Q, d] against `texts: [O + distractors, d]` (object j's phrase is row j), both ways."""
    objects = torch.tensor(regions["object"], dtype=torch.long)
    result = {"regions": len(objects), "texts": len(texts), "objects": int(objects.unique().numel())}
    if len(objects) == 0:
        return result
    kinds = {"rendered": regions["rendered"]}
    if regions["raw"]:
        kinds["raw"] = regions["raw"]
    text_unit = F.normalize(texts, dim=-1)
    for kind, rows in kinds.items():
        similarity = (F.normalize(torch.stack(rows), dim=-1) @ text_unit.T).cpu()   # [Q, T]
        i2t_positive = torch.zeros(similarity.shape, dtype=torch.bool)
        i2t_positive[torch.arange(len(objects)), objects] = True
        present = objects.unique()                                                  # phrases with at least one region
        t2i = similarity.T[present]                                                 # [O', Q]
        t2i_positive = objects[None, :] == present[:, None]
        result[kind] = {"i2t": recall_at_k(similarity, i2t_positive, config.recall_ks),
                        "t2i": recall_at_k(t2i, t2i_positive, config.recall_ks)}
    return result


def _localisation(engine: QueryEngine, truth: GroundTruth, texts: Tensor, config: EvalConfig,
                  latencies: list[float]) -> dict:
    """Per object, the query engine's whole-memory answer (the memory server's without a view): its target (the direct
    3D query) and what the rendered training views alone found; appends each answer's ms to `latencies`. A query the
    engine refuses counts as a miss."""
    options = QueryOptions(method=config.method, max_search_views=config.search_views, min_alpha=config.min_alpha)
    per_object = []
    for j, obj in enumerate(truth.objects):
        center = np.asarray(obj["center"], dtype=np.float64)
        started = time.perf_counter()
        try:
            answer = engine.answer(truth.phrases[j], None, options, text=texts[j])
        except QueryError:
            answer = None
        latencies.append(1e3 * (time.perf_counter() - started))
        rendered = None if answer is None else answer.rendered_point
        per_object.append({"phrase": truth.phrases[j],
                           "rendered_error_m": None if rendered is None else float(np.linalg.norm(rendered - center)),
                           "direct_3d_error_m": None if answer is None else float(np.linalg.norm(answer.point - center))})
    return {
        "rendered": _success(per_object, "rendered_error_m", config.success_radius_m),
        "direct_3d": _success(per_object, "direct_3d_error_m", config.success_radius_m),
        "per_object": per_object,
    }


def _success(rows: list[dict], key: str, radius: float) -> dict:
    """Success rate within `radius` (a failed query counts as a miss) and mean/median error of the answered ones."""
    errors = [r[key] for r in rows if r[key] is not None]
    return {"success_rate": float(np.mean([r[key] is not None and r[key] <= radius for r in rows])),
            "mean_error_m": float(np.mean(errors)) if errors else None,
            "median_error_m": float(np.median(errors)) if errors else None,
            "answered": len(errors), "queries": len(rows)}


def report_markdown(report: dict) -> str:
    """A human-readable summary of an `evaluate` report."""
    v, cost = report["views"], report["cost"]
    held = (f"{len(v['evaluated'])} held-out views (every {v['holdout_every']}th)" if v["held_out"]
            else f"all {v['total']} views (none held out)")
    lines = [f"# Evaluation: {report['method']} on {report['scene']}", "", f"{held}, {v['size'][0]}x{v['size'][1]}.",
             "", "| metric | value |", "|---|---|",
             f"| PSNR | {report['rgb']['psnr']:.2f} dB |", f"| SSIM | {report['rgb']['ssim']:.3f} |"]
    for model, f in report["features"].items():
        if f["views"]:
            lines += [f"| {model} cosine distance | {f['cosine_distance']:.3f} |", f"| {model} L2 | {f['l2']:.3f} |"]
    for model, g in report["grounding"].items():
        if g["pairs"]:
            lines += [f"| {model} mIoU / cIoU | {g['miou']:.3f} / {g['ciou']:.3f} |",
                      f"| {model} P@0.5 / P@0.6 | {g['p50']:.3f} / {g['p60']:.3f} ({g['pairs']} pairs) |"]
    for model, r in report["retrieval"].items():
        for kind in ("rendered", "raw"):
            if kind in r:
                for way in ("i2t", "t2i"):
                    recalls = " / ".join(f"{value:.2f}" for value in r[kind][way].values())
                    lines.append(f"| {model} {way.upper()} R@{'/'.join(k[1:] for k in r[kind][way])} ({kind}) "
                                 f"| {recalls} |")
    for model, loc in report["localisation"].items():
        for kind in ("rendered", "direct_3d"):
            s = loc[kind]
            mean = "-" if s["mean_error_m"] is None else f"{100 * s['mean_error_m']:.1f} cm"
            lines.append(f"| {model} 3D {kind} success ≤ {100 * report['config']['success_radius_m']:.0f} cm "
                         f"| {s['success_rate']:.2f} (mean error {mean}) |")
    train_s = "-" if cost["train_s"] is None else f"{cost['train_s']:.0f} s"
    locate_ms = "-" if cost["locate_ms_mean"] is None else f"{cost['locate_ms_mean']:.0f} / {cost['locate_ms_p95']:.0f}"
    lines += [f"| parameters | {cost['parameters']:,} ({cost['gaussians']:,} Gaussians, banks {cost['bank_sizes']}) |",
              f"| training | {cost['iterations']} iterations, {train_s} |",
              f"| render + decode | {cost['render_ms_mean']:.1f} ms/frame on {cost['device']} |",
              f"| locate mean / p95 | {locate_ms} ms over {cost['locate_views']} views |"]
    if report["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"
