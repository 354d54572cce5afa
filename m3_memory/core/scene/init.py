"""Initial points of the Gaussians: back-projected depth (a recorded RGB-D scene) or COLMAP points3D (an import)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from m3_memory.core.geometry import backproject_pixels
from m3_memory.core.scene.format import Scene, SceneError

INIT_METHODS = ("depth", "colmap")


def _subsample(xyz: np.ndarray, rgb: np.ndarray, max_points: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if max_points is not None and len(xyz) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(xyz), size=max_points, replace=False))
        xyz, rgb = xyz[keep], rgb[keep]
    return xyz.astype(np.float32), rgb.astype(np.float32)


def init_points_from_colmap(
    scene: Scene, max_points: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The scene's `points3D.npz` (written by `m3 import-colmap`): `(xyz: [P, 3] float32, rgb: [P, 3] float32 in
    [0, 1])`, randomly subsampled (seeded) to `max_points`.

    COLMAP triangulated these from all its images, held-out ones included: an evaluation on held-out views sees
    geometry they contributed to (their colours and features are still never trained on).
    """
    points = scene.points()
    if points is None:
        raise SceneError(
            f"{scene.root} has no points3D.npz: `init: colmap` is for scenes written by `m3 import-colmap`; "
            "use `init: depth` for a recorded RGB-D scene"
        )
    if len(points.xyz) == 0:
        raise SceneError(f"{scene.root}: the COLMAP model has no 3D points; run its triangulation first")
    return _subsample(points.xyz, points.rgb / 255.0, max_points, seed)


def init_points_from_depth(
    scene: Scene, stride: int = 4, max_points: int | None = 200_000, seed: int = 0, views: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Back-project every `stride`-th pixel (both axes) with valid depth of every frame (or of the frame indices
    `views`) into the world frame.

    Returns `(xyz: [P, 3] float32 world metres, rgb: [P, 3] float32 in [0, 1])`, randomly subsampled (seeded) to
    `max_points`.
    """
    if stride < 1:
        raise SceneError(f"stride must be >= 1, got {stride}")
    all_xyz, all_rgb = [], []
    for i in range(len(scene.frames)) if views is None else views:
        depth = scene.depth(i)
        if depth is None:
            continue
        vs, us = np.nonzero(depth[::stride, ::stride] > 0)
        vs, us = vs * stride, us * stride
        frame = scene.frames[i]
        all_xyz.append(backproject_pixels(us, vs, depth[vs, us], frame.K, frame.c2w))
        all_rgb.append(scene.image(i)[vs, us] / 255.0)
    if sum(len(xyz) for xyz in all_xyz) == 0:
        raise SceneError(
            f"{scene.root}: no frame has valid depth; a scene imported from COLMAP trains with `init: colmap`"
        )
    return _subsample(np.concatenate(all_xyz), np.concatenate(all_rgb), max_points, seed)


def initial_points(
    scene: Scene, method: str, stride: int = 4, max_points: int | None = 200_000, seed: int = 0,
    views: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Initial points by `method` ("depth": `init_points_from_depth` over `views`; "colmap":
    `init_points_from_colmap`, which ignores `stride` and `views`): `(xyz: [P, 3], rgb: [P, 3] in [0, 1])` float32."""
    if method == "depth":
        return init_points_from_depth(scene, stride=stride, max_points=max_points, seed=seed, views=views)
    if method == "colmap":
        return init_points_from_colmap(scene, max_points=max_points, seed=seed)
    raise SceneError(f"init must be one of {list(INIT_METHODS)}, got {method!r}")
