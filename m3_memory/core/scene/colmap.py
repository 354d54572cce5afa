"""COLMAP import: a sparse model (text or binary, read by pycolmap) and its images → a scene directory.

COLMAP's image coordinates put the centre of the top-left pixel at (0.5, 0.5), the convention of our renderers
(`m3_memory.core.geometry.backproject_pixels`), so its intrinsics are used as they are. A COLMAP world has an arbitrary
frame and scale; `align_to` maps it onto a recorded robot scene's world frame by a least-squares similarity of the
camera centres of the images both hold (matched by name), as M3 does with its robot's poses.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from m3_memory.core.geometry import invert_pose, sim3_apply_pose, sim3_fit
from m3_memory.core.scene.format import (
    META_FILE,
    Scene,
    SceneError,
    SceneMeta,
    ScenePoints,
    SceneWriter,
    write_points,
)

_NOT_IN_ID = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class ColmapCamera:
    camera_id: int
    model: str
    width: int
    height: int
    params: np.ndarray  # [k] model parameters as COLMAP orders them


@dataclass
class ColmapImage:
    image_id: int
    camera_id: int
    name: str           # path relative to the images folder, as COLMAP stores it
    c2w: np.ndarray     # [4, 4] camera-to-world (COLMAP stores world-to-camera; OpenCV camera convention)


@dataclass
class ColmapModel:
    """A COLMAP sparse model: its registered images (sorted by name) and `points: [P, 3]` of points3D."""

    cameras: dict[int, ColmapCamera]
    images: list[ColmapImage]
    points: ScenePoints


@dataclass(frozen=True)
class Alignment:
    """The similarity `x_robot = s R x_colmap + t` fitted on `matched` camera centres; `rms_m`: their residual."""

    s: float
    R: np.ndarray   # [3, 3]
    t: np.ndarray   # [3]
    matched: int
    rms_m: float


def read_colmap_model(model_dir: str | Path) -> ColmapModel:
    """Read a COLMAP sparse model directory (`cameras/images/points3D` `.bin` or `.txt`; binary preferred when both)."""
    try:
        import pycolmap
    except ImportError as exc:
        raise SceneError("reading COLMAP models needs pycolmap: pip install -r requirements.txt") from exc
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SceneError(f"COLMAP model directory {model_dir} does not exist (it is e.g. sparse/0 of a COLMAP project)")
    try:
        reconstruction = pycolmap.Reconstruction(model_dir)
    except ValueError as exc:  # pycolmap's error for missing or malformed files
        raise SceneError(
            f"{model_dir} is not a readable COLMAP model ({exc}); it needs cameras, images and points3D .bin or .txt"
        ) from exc
    cameras = {
        int(cam_id): ColmapCamera(int(cam_id), cam.model_name, int(cam.width), int(cam.height),
                                  np.asarray(cam.params, dtype=np.float64))
        for cam_id, cam in reconstruction.cameras.items()
    }
    images = [
        ColmapImage(int(image_id), int(image.camera_id), image.name,
                    invert_pose(np.vstack([image.cam_from_world().matrix(), [0.0, 0.0, 0.0, 1.0]])))
        for image_id, image in reconstruction.images.items()
        if image.has_pose   # images COLMAP could not register have no pose
    ]
    images.sort(key=lambda image: image.name)
    points = [point for _, point in sorted(reconstruction.points3D.items())]   # by id: a stable order
    xyz = np.array([point.xyz for point in points], dtype=np.float64).reshape(-1, 3)
    rgb = np.array([point.color for point in points], dtype=np.uint8).reshape(-1, 3)
    return ColmapModel(cameras, images, ScenePoints(xyz, rgb))


def colmap_intrinsics(camera: ColmapCamera) -> np.ndarray:
    """`K: [3, 3]` of an undistorted COLMAP camera (SIMPLE_PINHOLE or PINHOLE)."""
    if camera.model == "SIMPLE_PINHOLE":
        f, cx, cy = camera.params
        fx = fy = f
    elif camera.model == "PINHOLE":
        fx, fy, cx, cy = camera.params
    else:
        raise SceneError(
            f"COLMAP camera {camera.camera_id} has model {camera.model}; undistort first "
            "(`colmap image_undistorter`) so cameras are PINHOLE/SIMPLE_PINHOLE"
        )
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def frame_id_of(name: str) -> str:
    """Scene frame id of a COLMAP image name: its path without the suffix, other characters than [A-Za-z0-9_.-]
    (folders' '/', spaces) as '_'. `rgb/000012.png` → `rgb_000012`; a recorded scene's `000012.png` → `000012`."""
    return _NOT_IN_ID.sub("_", Path(name).with_suffix("").as_posix())


def align_to_scene(model: ColmapModel, robot: Scene) -> Alignment:
    """Fit the similarity from `model`'s world to `robot`'s on the camera centres of the images both hold, matched
    by name: a COLMAP image and a robot frame match when the image's file name without its suffix is the frame id
    (run COLMAP on a recorded scene's `rgb/` folder for that)."""
    robot_centres = {frame.frame_id: frame.c2w[:3, 3] for frame in robot.frames}
    pairs = [(image.c2w[:3, 3], robot_centres[Path(image.name).stem])
             for image in model.images if Path(image.name).stem in robot_centres]
    if len(pairs) < 3:
        raise SceneError(
            f"only {len(pairs)} COLMAP images match frames of {robot.root} by name (image file name = frame id); "
            "aligning needs at least 3 with camera centres not on one line"
        )
    src, dst = (np.stack(side) for side in zip(*pairs))
    try:
        s, R, t = sim3_fit(src, dst)
    except ValueError as exc:
        raise SceneError(f"cannot align to {robot.root}: {exc}") from exc
    rms = float(np.sqrt(np.mean(np.sum((s * src @ R.T + t - dst) ** 2, axis=1))))
    return Alignment(s, R, t, len(pairs), rms)


def import_colmap(model_dir: str | Path, images_dir: str | Path, out: str | Path,
                  align_to: Scene | None = None) -> tuple[Scene, Alignment | None]:
    """Write the scene directory `out` (new or empty) of a COLMAP model and its images.

    Every registered image becomes a frame (ordered by name, timestamps = frame index, no depth) with its camera's
    intrinsics; points3D go to `points3D.npz` for `init: colmap`. With `align_to` (a recorded scene) poses and points
    are mapped into its world frame (metric, named as there) by `align_to_scene`; otherwise the world frame is
    "colmap" (arbitrary scale). Returns the loaded scene and the alignment (None without `align_to`).
    """
    out, images_dir = Path(out), Path(images_dir)
    if (out / META_FILE).exists():
        raise SceneError(f"{out} already holds a scene; import into a new directory")
    model = read_colmap_model(model_dir)
    if not model.images:
        raise SceneError(f"{model_dir}: the COLMAP model has no registered images")
    sizes = {(model.cameras[image.camera_id].width, model.cameras[image.camera_id].height) for image in model.images}
    if len(sizes) != 1:
        raise SceneError(f"COLMAP cameras have different image sizes {sorted(sizes)}: resize to one size first")
    ((width, height),) = sizes
    alignment = None if align_to is None else align_to_scene(model, align_to)
    c2ws = [image.c2w for image in model.images]
    points = model.points
    if alignment is not None:
        c2ws = [sim3_apply_pose(alignment.s, alignment.R, alignment.t, c2w) for c2w in c2ws]
        points = ScenePoints(alignment.s * points.xyz @ alignment.R.T + alignment.t, points.rgb)
    Ks = [colmap_intrinsics(model.cameras[image.camera_id]) for image in model.images]
    meta = SceneMeta(width=width, height=height, K=Ks[0],
                     world_frame="colmap" if align_to is None else align_to.world_frame)
    write_points(out, points)
    with SceneWriter(out, meta) as writer:
        for index, (image, c2w, K) in enumerate(zip(model.images, c2ws, Ks)):
            path = images_dir / image.name
            if not path.exists():
                raise SceneError(f"COLMAP image {image.name} not found in {images_dir}")
            with Image.open(path) as picture:
                rgb = np.asarray(picture.convert("RGB"))
            writer.add_frame(frame_id_of(image.name), rgb, c2w, index, K=K)
    return Scene.load(out), alignment
