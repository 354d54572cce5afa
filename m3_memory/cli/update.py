"""`m3 update MEMORY SCENE`: extend a memory with a new scan (core.online.update), no ROS needed."""
from __future__ import annotations

import json
import time
from pathlib import Path

from m3_memory.cli.common import add_settings, progress_bar


def register(verbs) -> None:
    update = verbs.add_parser("update", help="extend a memory with the views of a new scan (incremental, no retrain)")
    update.add_argument("memory", type=Path, help="a memory written with its training state (m3 train, m3 update)")
    update.add_argument("scene", type=Path, help="the new scan's scene directory")
    add_settings(update, "override the memory's training settings, and the update's with update.KEY, e.g. --set "
                         "update.iterations=200 device=cpu")
    update.add_argument("--output", type=Path, default=None, help="where to write (default: MEMORY, atomically)")
    update.set_defaults(func=_update)


def _update(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from m3_memory.core.checkpoint import load_memory
    from m3_memory.core.online import SceneViews, UpdateConfig, recorded_views, train_config_of, update
    from m3_memory.core.pipeline import Extractors, parse_overrides
    from m3_memory.core.scene import Scene
    from m3_memory.core.scene.format import META_FILE
    from m3_memory.core.trainer import training_views

    started = time.monotonic()
    memory, state = load_memory(args.memory)
    overrides = parse_overrides(args.set)
    settings = UpdateConfig.from_dict(overrides.pop("update", {}))
    config = train_config_of(memory, overrides)

    extractors = Extractors(memory.models, config.device)   # built once for the new scan and every replayed one

    def scan(root: Path, views) -> SceneViews:
        scene = Scene.load(root)
        features = extractors.scene_features(scene, root, lambda model: progress_bar(f"features {model}"))
        return SceneViews(scene, features, np.asarray(views), str(root))

    new_scene = Scene.load(args.scene)
    new = scan(args.scene, training_views(len(new_scene), config.holdout_every))
    old = []
    for name, views in recorded_views(memory).items():
        root = Path(name)
        if not (root / META_FILE).is_file():
            print(f"m3 update: {root} (recorded scan of this memory) is missing: its views are not replayed",
                  flush=True)
            continue
        old.append(scan(root, views))
    if not memory.sources:
        print("m3 update: the memory records no scans (written before provenance): no old views are replayed",
              flush=True)
    output = args.output or args.memory
    bar = tqdm(total=settings.iterations, desc="update", unit="it")

    def on_progress(progress):
        bar.update(progress.iteration - bar.n)
        bar.set_postfix(loss=f"{progress.loss:.4f}", gaussians=progress.num_gaussians)

    result = update(memory, state, new, old, config, settings, output, callback=on_progress)
    bar.close()
    figures = result.sources[-1]["update"]
    summary = {"checkpoint": str(output), "seconds": round(time.monotonic() - started, 1),
               "iterations": settings.iterations, "gaussians": len(result.gaussians), "pruned": figures["pruned"],
               "seeded": figures["seeded"], "bank_sizes": result.bank_sizes(), "scans": len(result.sources),
               "replayed": len(old), "psnr": round(result.config["final"]["psnr"], 2)}
    print(json.dumps(summary))
    return 0
