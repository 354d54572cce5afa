"""Generate the demo / test tabletop scene: a scene directory, a rosbag2 bag and preview pictures.

Output layout (the scene directory is the root, so `Scene.load(demo_scene())` works directly)::

    scene.json, frames.jsonl, rgb/, depth/   keyframes in the core scene format (ground-truth camera poses)
    objects.json                            per object: name, phrases, centre, axis-aligned box, mask index;
                                            "moves": the objects displaced for this scan (`generate`)
    masks/<frame_id>.png                    uint8 per-pixel object index of each keyframe (0 = background)
    camera_trajectory.json                  ground-truth camera pose of every frame in the bag
    bag/                                    rosbag2 (MCAP): camera, /tf, /tf_static, /odom
    previews/<frame_id>.png                 a few keyframes with the ground-truth boxes drawn
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from m3_memory.core.resources import cache_dir  # root of generated data (re-exported by m3_memory.sim)
from m3_memory.core.scene import SceneMeta, SceneWriter, encode_depth, save_png_atomic
from m3_memory.sim.bag import CameraFrame, write_bag
from m3_memory.sim.robot import WORLD, RigConfig, TimingConfig, make_trajectory
from m3_memory.sim.world import CATALOG, TABLE_HALF_XY, PlacedObject, TabletopWorld

GENERATOR_VERSION = 1


@dataclass(frozen=True)
class SimConfig:
    """One scene size: image size, horizontal field of view, objects, recording length, keyframe spacing."""

    width: int
    height: int
    objects: tuple[str, ...]
    timing: TimingConfig
    rig: RigConfig = field(default_factory=RigConfig)
    hfov_deg: float = 69.0  # RealSense D435 colour camera
    keyframe_every: int = 6  # every k-th received camera frame goes into the scene directory
    n_previews: int = 4
    places: dict[str, tuple[float, float]] = field(default_factory=dict)  # name → fixed table (x, y), not sampled


SIZES: dict[str, SimConfig] = {
    "tiny": SimConfig(
        width=160,
        height=120,
        objects=("yellow bath duck", "cat photo box", "yellow ball"),
        timing=TimingConfig(duration_s=1.0),
        rig=RigConfig(arc=np.pi / 2),
        keyframe_every=5,
        n_previews=2,
    ),
    # A layout and walk that no default was tuned on: another seed's placement, half a circle from the far side,
    # a lower camera (the query engine's test of camera-view answers).
    "unseen": SimConfig(
        width=160,
        height=120,
        objects=("yellow bath duck", "red mug", "soccer ball", "cat photo box", "red cube"),
        timing=TimingConfig(duration_s=2.0),
        rig=RigConfig(arc=np.pi, start_angle=np.pi / 3, camera_height=0.45, camera_radius=0.8),
        keyframe_every=5,
        n_previews=2,
    ),
    # Issue #15's split scan (test_online's split test): a pass along the table's near long side, the camera looking
    # straight across, so in time order it sees the -x end first and the +x end second. The duck stands at the +x end:
    # no pixel of it in the first half of the keyframes (indices < n // 2), some in the second; the other objects
    # are seen in the first half (test_sim checks both from the masks). A memory of the first half cannot know the
    # duck, an update with the second half has to find it.
    "halves": SimConfig(
        width=160,
        height=120,
        objects=("yellow bath duck", "cat photo box", "yellow ball", "red mug"),
        timing=TimingConfig(duration_s=2.0),
        rig=RigConfig(arc=1.4, start_angle=-np.pi / 2 - 0.7, camera_radius=0.7, camera_height=0.6,
                      target_follow_x=1.0),
        keyframe_every=5,
        n_previews=2,
        places={"yellow bath duck": (0.55, -0.25), "cat photo box": (-0.25, -0.2), "yellow ball": (-0.2, 0.2),
                "red mug": (0.05, -0.1)},
    ),
    "demo": SimConfig(
        width=320,
        height=240,
        objects=(
            "yellow bath duck",
            "red mug",
            "soccer ball",
            "cat photo box",
            "coffee picture",
            "rocket picture",
            "yellow ball",
            "red cube",
        ),
        timing=TimingConfig(duration_s=10.0),
        keyframe_every=6,
    ),
}


def intrinsics(config: SimConfig) -> np.ndarray:
    """`K: [3, 3]` of a centred pinhole camera with the configured horizontal field of view."""
    focal = config.width / 2 / np.tan(np.radians(config.hfov_deg) / 2)
    return np.array([[focal, 0.0, config.width / 2 - 0.5], [0.0, focal, config.height / 2 - 0.5], [0.0, 0.0, 1.0]])


def _place_objects(world: TabletopWorld, names: tuple[str, ...], rng: np.random.Generator,
                   moves: dict[str, tuple[float, float]], places: dict[str, tuple[float, float]]) -> None:
    """Scatter objects over the table top without overlaps (rejection sampling on footprint circles; the objects
    named in `places` stand at their given (x, y) instead), then shift the objects named in `moves` by their
    `(dx, dy)` (metres, world frame): the layout is made first either way, so a scan with moves is the same table as
    the one without, only those objects displaced (and their yaw kept)."""
    margin, clearance = 0.15, 0.04
    for given, what in ((moves, "move"), (places, "place")):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"cannot {what} {unknown}: this scene's objects are {list(names)}")
    footprint = {name: CATALOG[name].size * 0.8 for name in names}  # generous radius: billboards are wider than tall
    fixed = [(name, np.asarray(xy, dtype=float), footprint[name]) for name, xy in places.items()]
    placed: list[tuple[str, np.ndarray, float, float]] = []   # name, centre xy, footprint radius, yaw
    for name in names:
        if name in places:
            xy = np.asarray(places[name], dtype=float)
        else:
            for _ in range(1000):
                xy = rng.uniform(-1, 1, size=2) * (np.array(TABLE_HALF_XY) - margin)
                if all(np.linalg.norm(xy - other[1]) > footprint[name] + other[2] + clearance
                       for other in [*placed, *fixed]):
                    break
            else:
                raise RuntimeError(f"no room on the table for {name!r}; use fewer or smaller objects")
        placed.append((name, xy, footprint[name], float(rng.uniform(-np.pi, np.pi))))
    placed = [(name, xy + np.asarray(moves.get(name, (0.0, 0.0)), dtype=float), radius, yaw)
              for name, xy, radius, yaw in placed]
    for name in [*places, *moves]:
        verb, act = ("moved", "move") if name in moves else ("placed", "place")
        _, xy, radius, _ = next(p for p in placed if p[0] == name)
        if np.any(np.abs(xy) > np.array(TABLE_HALF_XY) - radius / 2):
            raise ValueError(f"{verb} {name!r} to ({xy[0]:.2f}, {xy[1]:.2f}): off the table (half size "
                             f"{TABLE_HALF_XY} m); {act} it less far")
        hit = [other for other, oxy, oradius, _ in placed if other != name and
               np.linalg.norm(xy - oxy) <= radius + oradius + clearance]
        if hit:
            raise ValueError(f"{verb} {name!r} to ({xy[0]:.2f}, {xy[1]:.2f}): it would overlap {hit}; {act} it "
                             "elsewhere")
    for name, xy, _, yaw in placed:
        world.add(CATALOG[name], xy, yaw=yaw)


def _bbox_corners(obj: PlacedObject) -> np.ndarray:
    """`[8, 3]` corners of the object's axis-aligned box."""
    lo, hi = obj.bbox_min, obj.bbox_max
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])


def draw_preview(
    rgb: np.ndarray, c2w: np.ndarray, K: np.ndarray, objects: list[PlacedObject], scale: int = 2
) -> Image.Image:
    """Upscaled `rgb: [H, W, 3]` with every object's 3D ground-truth box projected as a wireframe and labelled."""
    image = Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    w2c = np.linalg.inv(c2w)
    edges = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]
    for obj in objects:
        cam = _bbox_corners(obj) @ w2c[:3, :3].T + w2c[:3, 3]
        if np.any(cam[:, 2] < 0.05):
            continue
        uv = (cam @ K.T)[:, :2] / cam[:, 2:3]
        pix = (uv + 0.5) * scale  # OpenCV pixel centres -> upscaled image coordinates
        for a, b in edges:
            draw.line([tuple(pix[a]), tuple(pix[b])], fill=(0, 255, 0), width=1)
        draw.text(tuple(pix.min(0) + np.array([0, -11])), obj.spec.name, fill=(0, 255, 0))
    return image


def generate(out: Path, config: SimConfig, seed: int = 0, progress: Callable[[str], None] = lambda _: None,
             moves: dict[str, tuple[float, float]] | None = None) -> dict:
    """Write a complete scene into the new directory `out`; returns a summary (counts, seconds, bag bytes).

    `moves`: object name → `(dx, dy)` metres on the table top (world frame): the same table, layout and camera walk as
    without, those objects displaced, so two scans of one seed differ only by them (a change to detect). objects.json
    carries every object's true place in this scan and the `moves` made."""
    moves = dict(moves or {})
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    K = intrinsics(config)
    trajectory = make_trajectory(config.rig, config.timing, rng)
    world = TabletopWorld()
    try:
        _place_objects(world, config.objects, rng, moves, config.places)
        meta = SceneMeta(width=config.width, height=config.height, K=K, world_frame=WORLD)
        frames, keyframes, poses = [], [], []
        with SceneWriter(out, meta) as writer:
            for i, stamp in enumerate(trajectory.camera_stamps_ns):
                c2w = trajectory.camera_pose(int(stamp))
                rgb, depth, labels = world.render(c2w, K, config.width, config.height)
                frames.append(CameraFrame(int(stamp), rgb, encode_depth(depth, meta.depth_scale)))
                poses.append(c2w)
                if i % config.keyframe_every == 0:
                    frame_id = f"{i:06d}"
                    writer.add_frame(frame_id, rgb, c2w, int(stamp), depth=depth)
                    save_png_atomic(out / "masks" / f"{frame_id}.png", labels)
                    keyframes.append((frame_id, rgb, c2w))
                if (i + 1) % 30 == 0 or i + 1 == len(trajectory.camera_stamps_ns):
                    progress(f"rendered {i + 1}/{len(trajectory.camera_stamps_ns)} camera frames")
        objects = {
            "world_frame": WORLD,
            "mask_encoding": "masks/<frame_id>.png uint8: 0 background, k objects[k-1]",
            "objects": [obj.to_json() for obj in world.objects],
        }
        if moves:
            objects["moves"] = {name: [float(dx), float(dy), 0.0] for name, (dx, dy) in moves.items()}
        (out / "objects.json").write_text(json.dumps(objects, indent=2) + "\n")
        (out / "camera_trajectory.json").write_text(
            json.dumps(
                {
                    "frame": "camera_color_optical_frame, OpenCV convention; c2w maps camera to world",
                    "stamps_ns": trajectory.camera_stamps_ns.tolist(),
                    "dropped_stamps_ns": trajectory.dropped_stamps_ns.tolist(),
                    "c2w": np.stack(poses).tolist(),
                }
            )
            + "\n"
        )
        (out / "previews").mkdir()
        for j in np.linspace(0, len(keyframes) - 1, min(config.n_previews, len(keyframes))).round().astype(int):
            frame_id, rgb, c2w = keyframes[j]
            draw_preview(rgb, c2w, K, world.objects).save(out / "previews" / f"{frame_id}.png")
    finally:
        world.close()
    progress("writing rosbag2 (MCAP)")
    write_bag(out / "bag", trajectory, frames, K)
    bag_bytes = sum(path.stat().st_size for path in (out / "bag").iterdir())
    summary = {
        "camera_frames": len(frames),
        "dropped_frames": len(trajectory.dropped_stamps_ns),
        "keyframes": len(keyframes),
        "objects": len(world.objects),
        "bag_bytes": bag_bytes,
        "seconds": round(time.perf_counter() - started, 2),
    }
    progress(f"done: {summary}")
    return summary


def demo_scene(
    size: str = "demo",
    seed: int = 0,
    out: str | Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
    moves: dict[str, tuple[float, float]] | None = None,
) -> Path:
    """Generate (or reuse from the cache) the tabletop scene and return its directory (layout: module docstring).

    With `out=None` the scene is cached under `cache_dir()/demo_scene/<size>-seed<seed>-v<GENERATOR_VERSION>`, with
    `-moved-<name>_<dx>_<dy>...` appended for `moves` (see `generate`).
    Generation happens in a temporary sibling directory renamed into place at the end, so an interrupted run never
    leaves a partial scene at the final path. An explicit `out` must not exist yet (or be an empty directory).
    """
    if size not in SIZES:
        raise ValueError(f"unknown scene size {size!r}; choose one of {sorted(SIZES)}")
    moves = dict(moves or {})
    name = f"{size}-seed{seed}-v{GENERATOR_VERSION}"
    if moves:
        name += "-moved-" + "-".join(f"{object_name.replace(' ', '_')}_{dx:+.3f}_{dy:+.3f}"
                                     for object_name, (dx, dy) in sorted(moves.items()))
    final = Path(out) if out is not None else cache_dir() / "demo_scene" / name
    if final.exists():
        if out is None:
            return final
        if any(final.iterdir()):
            raise FileExistsError(f"{final} exists and is not empty; choose a new --out directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary data directory
    try:
        generate(staging, SIZES[size], seed, progress, moves)
        try:
            os.replace(staging, final)
        except OSError:
            if out is not None or not final.exists():
                raise
            shutil.rmtree(staging)  # another process cached the same scene first: keep theirs
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
