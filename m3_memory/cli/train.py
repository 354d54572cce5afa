"""`m3 train SCENE`: train an M3 memory from a scene directory, no ROS needed."""
from __future__ import annotations

import json
import time
from pathlib import Path

from m3_memory.cli.common import add_settings, progress_bar
from m3_memory.core.pipeline import DEFAULT_TRAIN_CONFIG


def register(verbs) -> None:
    train = verbs.add_parser("train", help="train an M3 memory from a scene directory (CPU or CUDA)")
    train.add_argument("scene", type=Path)
    train.add_argument("--models", nargs="+", default=["m3-tinyvlm"], help="feature models (config/features.yaml)")
    train.add_argument("--config", type=Path, default=None, help=f"training YAML (default {DEFAULT_TRAIN_CONFIG})")
    add_settings(train, "override settings, e.g. --set iterations=500 densify.refine_every=50")
    train.add_argument("--out", type=Path, default=None, help="checkpoint path (default SCENE/memory.pt)")
    train.set_defaults(func=_train)


def _train(args) -> int:
    from tqdm import tqdm

    from m3_memory.core.pipeline import load_train_config, parse_overrides, scene_features
    from m3_memory.core.scene import Scene
    from m3_memory.core.trainer import train

    scene = Scene.load(args.scene)
    config = load_train_config(args.config, parse_overrides(args.set))
    started = time.monotonic()
    features = scene_features(scene, args.scene, args.models, lambda model: progress_bar(f"features {model}"),
                              device=config.device)
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
