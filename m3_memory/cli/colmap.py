"""`m3 import-colmap MODEL_DIR IMAGES_DIR --out SCENE`: a COLMAP reconstruction → a scene directory to train on."""
from __future__ import annotations

import json
from pathlib import Path


def register(verbs) -> None:
    parser = verbs.add_parser(
        "import-colmap", help="write a scene directory from a COLMAP sparse model (text or binary) and its images",
        description="Every registered image becomes a frame (no depth); points3D seed the Gaussians: train it with "
                    "`m3 train SCENE --set init=colmap`.")
    parser.add_argument("model_dir", type=Path, help="COLMAP sparse model folder (e.g. sparse/0), .bin or .txt")
    parser.add_argument("images_dir", type=Path, help="folder the model's image names are relative to")
    parser.add_argument("--out", type=Path, required=True, help="new scene directory")
    parser.add_argument("--align-to", type=Path, default=None, metavar="SCENE",
                        help="recorded scene whose frames share image names: map poses and points into its metric "
                             "world frame (similarity fitted on camera centres)")
    parser.set_defaults(func=_import)


def _import(args) -> int:
    from m3_memory.core.scene import Scene, import_colmap

    robot = None if args.align_to is None else Scene.load(args.align_to)
    scene, alignment = import_colmap(args.model_dir, args.images_dir, args.out, align_to=robot)
    points = scene.points()
    summary = {"scene": str(args.out), "frames": len(scene), "points": 0 if points is None else len(points.xyz),
               "world_frame": scene.world_frame, "alignment": None}
    if alignment is not None:
        summary["alignment"] = {"scale": alignment.s, "rotation": alignment.R.tolist(),
                                "translation": alignment.t.tolist(), "matched": alignment.matched,
                                "rms_m": alignment.rms_m}
    print(json.dumps(summary))
    return 0
