"""`m3 train SCENE` and `m3 query MEMORY "phrase"`: the engine from the command line, no ROS needed."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

DEFAULT_TRAIN_CONFIG = Path(__file__).resolve().parents[2] / "config" / "train.yaml"


def parse_overrides(items: list[str]) -> dict:
    """`["iterations=500", "densify.refine_every=50"]` → nested dict with YAML-typed values."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r} must be written key=value")
        node = out
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(value)
    return out


def merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def load_train_config(path: Path | None, overrides: dict):
    from m3_memory.core.trainer import TrainConfig

    path = path or DEFAULT_TRAIN_CONFIG
    base = yaml.safe_load(path.read_text()) or {}
    return TrainConfig.from_dict(merge(base, overrides))


def scene_features(scene, scene_dir: Path, models: list[str], progress: bool = True) -> dict:
    """Cached dense features of every view for each named model → `{name: ViewFeatures}`."""
    from m3_memory.core.features.cache import FeatureCache, extract_scene
    from m3_memory.core.features.registry import build_extractor
    from m3_memory.core.trainer import ViewFeatures

    features = {}
    for name in models:
        extractor = build_extractor(name)
        maps = extract_scene(scene, extractor, FeatureCache(scene_dir / "features", extractor), progress=progress)
        features[name] = ViewFeatures(identity=extractor.identity.to_json(), maps=maps)
    return features


def run_verb(verb: str, body: Callable[..., int], args) -> int:
    """`body(args)`'s exit code, or 2 with `m3 VERB: why` on stderr when it fails on the user's input or files."""
    from m3_memory.core.errors import M3Error

    try:
        return body(args)
    except (M3Error, ValueError, OSError) as exc:
        print(f"m3 {verb}: {exc}", file=sys.stderr)
        return 2


def run_train(args) -> int:
    return run_verb("train", _train, args)


def _train(args) -> int:
    from tqdm import tqdm

    from m3_memory.core.scene import Scene
    from m3_memory.core.trainer import train

    scene = Scene.load(args.scene)
    config = load_train_config(args.config, parse_overrides(args.set))
    started = time.monotonic()
    features = scene_features(scene, args.scene, args.models)
    output = args.out or args.scene / "memory.pt"
    bar = tqdm(total=config.iterations, desc="train", unit="it")

    def on_progress(progress):
        bar.update(progress.iteration - bar.n)
        bar.set_postfix(loss=f"{progress.loss:.4f}", gaussians=progress.num_gaussians)

    memory = train(scene, features, config, output, callback=on_progress)
    bar.close()
    summary = {"checkpoint": str(output), "seconds": round(time.monotonic() - started, 1),
               "iterations": config.iterations, "gaussians": len(memory.gaussians),
               "bank_sizes": memory.bank_sizes(), "parameters": memory.num_parameters(),
               "psnr": round(memory.config["final"]["psnr"], 2)}
    print(json.dumps(summary))
    return 0


def run_query(args) -> int:
    from m3_memory.core.checkpoint import load_memory
    from m3_memory.core.errors import M3Error
    from m3_memory.core.locate import locate, locate_gaussians, text_encoder
    from m3_memory.core.query import validate_query

    try:
        phrase = validate_query(args.query)
        memory, _ = load_memory(args.memory)
        model = args.model or memory.models[0]
        text = text_encoder(memory, model).encode_text([phrase])[0]
        views = memory.views
        started = time.monotonic()
        result = locate(memory, text, views["c2w"], views["K"], views["width"], views["height"], model=model,
                        method=args.method)
        rendered_ms = (time.monotonic() - started) * 1000
        point3d, score3d = locate_gaussians(memory, text, model=model)
    except M3Error as exc:
        print(f"m3 query: {exc}", file=sys.stderr)
        return 1
    answer = {"query": phrase, "target": result.point.round(4).tolist(), "score": round(result.score, 4),
              "view": result.view, "locate_ms": round(rendered_ms, 1), "direct_3d": point3d.round(4).tolist(),
              "direct_3d_score": round(score3d, 4), "frame_id": memory.world_frame}
    print(json.dumps(answer))
    return 0


def register(verbs) -> None:
    train = verbs.add_parser("train", help="train an M3 memory from a scene directory (CPU or CUDA)")
    train.add_argument("scene", type=Path)
    train.add_argument("--models", nargs="+", default=["m3-tinyvlm"], help="feature models (config/features.yaml)")
    train.add_argument("--config", type=Path, default=None, help=f"training YAML (default {DEFAULT_TRAIN_CONFIG})")
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override settings, e.g. iterations=500")
    train.add_argument("--out", type=Path, default=None, help="checkpoint path (default SCENE/memory.pt)")
    train.set_defaults(func=run_train)

    query = verbs.add_parser("query", help="locate a phrase in a trained memory (offline, from its training views)")
    query.add_argument("memory", type=Path)
    query.add_argument("query")
    query.add_argument("--model", default=None, help="which of the memory's models to query (default: the first)")
    query.add_argument("--method", choices=["otsu", "relevancy"], default="otsu")
    query.set_defaults(func=run_query)
