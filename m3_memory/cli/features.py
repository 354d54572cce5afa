"""`features` sub-command: fill a scene's feature cache with one model (`m3 features SCENE --model clip`).

Features go to `SCENE/features/<model identity>/` (or --cache-dir); a killed run resumes, corrupt entries are redone.
torch and the model are imported only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scene", type=Path, help="scene directory (scene.json, frames.jsonl, rgb/)")
    parser.add_argument("--model", default=None, help="model name in the features config (default: its `default`)")
    parser.add_argument("--config", type=Path, default=None, help="features YAML (default: config/features.yaml)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root (default: SCENE/features)")
    parser.add_argument("--device", default=None,
                        help="auto, cpu or cuda[:N] (default: the model's `device` setting, auto = cuda when present)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from m3_memory.cli.common import run_verb

    return run_verb("features", _run, args)  # a missing scene or weights, a bad config: the message says what to do


def _run(args: argparse.Namespace) -> int:
    from m3_memory.cli.common import progress_bar
    from m3_memory.core.features.cache import FeatureCache, extract_scene
    from m3_memory.core.features.registry import build_extractor
    from m3_memory.core.scene import Scene

    scene = Scene.load(args.scene)
    overrides = {"device": args.device} if args.device else {}
    extractor = build_extractor(args.model, args.config, **overrides)
    print(f"model: {extractor.describe()}", flush=True)
    cache = FeatureCache(args.cache_dir or args.scene / "features", extractor)
    features = extract_scene(scene, extractor, cache,
                             progress=None if args.no_progress else progress_bar(f"features {extractor.name}"))
    size = sum(array.nbytes for array in features)
    print(f"{len(features)} views, {features[0].shape} float16 each, {size / 1e6:.1f} MB in {cache.dir}"
          + (f" ({cache.recomputed} corrupt entries recomputed)" if cache.recomputed else ""))
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `features` to an `m3` sub-command parser; the parsed namespace's `func(args)` runs it."""
    parser = subparsers.add_parser("features", help="extract and cache foundation-model features of a scene",
                                   description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m m3_memory.cli.features SCENE [--model NAME]` (same as `m3 features`)."""
    parser = argparse.ArgumentParser(prog="python -m m3_memory.cli.features", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
