"""Captured-scene dataset: the directory format the recorder writes and the trainer reads, plus COLMAP text models.

Scene directory layout (format version 1)::

    scene.json      meta: version, world frame, camera model, image size, default intrinsics K, depth scale
    frames.jsonl    append-only index, one JSON object per frame:
                    {"id", "timestamp_ns", "rgb", "depth" (or null), "K" [3][3], "c2w" [4][4]}
    rgb/<id>.png    uint8 RGB
    depth/<id>.png  uint16 depth in units of `depth_scale` metres (RealSense aligned-depth style, 0 = no depth)

Poses are camera-to-world 4x4 matrices in the OpenCV camera convention (x right, y down, z forward), the world
being the frame named `world_frame`. The writer is crash-safe: image files are written to a temporary name and
renamed, then one index line is appended and fsynced, so a killed writer leaves a loadable scene of every completed
frame (a torn last line is dropped with a warning on load). Arrays returned here are numpy.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from transforms3d.quaternions import quat2mat

from m3_memory.core.atomic import write_atomic
from m3_memory.core.geometry import invert_pose, is_rigid, make_pose

SCENE_FORMAT_VERSION = 1
META_FILE = "scene.json"
INDEX_FILE = "frames.jsonl"
_FRAME_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


class SceneError(ValueError):
    """Invalid scene data or directory; the message says what to fix."""


@dataclass(frozen=True)
class SceneMeta:
    """Scene-wide metadata stored in `scene.json`.

    `K: [3][3]` default pinhole intrinsics (a frame may carry its own), `depth_scale` metres per depth-PNG unit.
    """

    width: int
    height: int
    K: tuple[tuple[float, float, float], ...]
    world_frame: str = "world"
    camera_model: str = "PINHOLE"
    depth_scale: float = 0.001
    version: int = SCENE_FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "K", tuple(tuple(float(v) for v in row) for row in np.asarray(self.K).tolist()))
        if self.width <= 0 or self.height <= 0:
            raise SceneError(f"image size {self.width}x{self.height} must be positive")
        _check_intrinsics(np.asarray(self.K), "scene.json")
        if not self.world_frame:
            raise SceneError("world_frame must be a non-empty frame name (e.g. 'world' or 'map')")
        if not self.depth_scale > 0:
            raise SceneError(f"depth_scale must be > 0 metres per unit, got {self.depth_scale}")
        if self.camera_model != "PINHOLE":
            raise SceneError(f"camera_model {self.camera_model!r} unsupported: undistort the images to PINHOLE")

    def to_json(self) -> dict:
        return {**asdict(self), "K": [list(row) for row in self.K]}

    @classmethod
    def from_json(cls, data: dict) -> "SceneMeta":
        if data.get("version") != SCENE_FORMAT_VERSION:
            raise SceneError(
                f"scene format version {data.get('version')} unsupported (this reader: {SCENE_FORMAT_VERSION})"
            )
        try:
            return cls(**data)
        except TypeError as exc:
            raise SceneError(f"scene.json fields invalid: {exc}") from exc


@dataclass
class Frame:
    """One posed view. `K: [3, 3]`, `c2w: [4, 4]` float64; image paths are relative to the scene root."""

    frame_id: str
    timestamp_ns: int
    rgb_path: str
    depth_path: str | None
    K: np.ndarray
    c2w: np.ndarray

    @property
    def timestamp(self) -> float:
        """Seconds (float; use `timestamp_ns` for exact look-ups)."""
        return self.timestamp_ns * 1e-9

    def to_json(self) -> dict:
        return {
            "id": self.frame_id,
            "timestamp_ns": int(self.timestamp_ns),
            "rgb": self.rgb_path,
            "depth": self.depth_path,
            "K": self.K.tolist(),
            "c2w": self.c2w.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict, where: str) -> "Frame":
        try:
            frame = cls(
                frame_id=str(data["id"]),
                timestamp_ns=int(data["timestamp_ns"]),
                rgb_path=str(data["rgb"]),
                depth_path=data.get("depth"),
                K=np.asarray(data["K"], dtype=np.float64),
                c2w=np.asarray(data["c2w"], dtype=np.float64),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SceneError(
                f"{where}: frame entry malformed ({exc!r}); every frame needs id, timestamp_ns, rgb, K, c2w"
            ) from exc
        _check_intrinsics(frame.K, where)
        _check_pose(frame.c2w, where)
        return frame


def _check_intrinsics(K: np.ndarray, where: str) -> None:
    if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise SceneError(f"{where}: intrinsics must be a finite 3x3 matrix with fx, fy > 0, got {K.tolist()}")


def _check_pose(c2w: np.ndarray, where: str) -> None:
    if c2w.shape != (4, 4):
        raise SceneError(f"{where}: camera-to-world pose must be 4x4, got shape {c2w.shape}")
    if not np.all(np.isfinite(c2w)):
        raise SceneError(
            f"{where}: camera-to-world pose has NaN/inf; drop this frame or fix its pose source (TF look-up)"
        )
    if not is_rigid(c2w):
        raise SceneError(
            f"{where}: camera-to-world pose is not a rigid transform (orthonormal rotation, last row 0 0 0 1)"
        )


def save_png_atomic(path: Path, image: np.ndarray) -> None:
    """Write `image` ([H, W, 3] uint8, or [H, W] uint8/uint16) as PNG via a temporary file and an atomic rename."""
    write_atomic(path, lambda handle: Image.fromarray(image).save(handle, format="PNG"))


def encode_depth(depth: np.ndarray, depth_scale: float) -> np.ndarray:
    """Metric `depth: [H, W]` float metres -> `[H, W]` uint16 units of `depth_scale`; invalid/non-positive -> 0."""
    units = np.where(np.isfinite(depth) & (depth > 0), depth / depth_scale, 0.0)
    return np.clip(np.rint(units), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def _read_index(path: Path) -> tuple[list[dict], int]:
    """Parse `frames.jsonl` -> (entries, byte length of its newline-terminated prefix).

    The writer appends each line with its newline in one write and fsyncs, so only an unterminated tail can come from
    an interrupted write: it is dropped with a warning. A broken line before that is corruption and raises.
    """
    raw = path.read_bytes() if path.exists() else b""
    body, newline, tail = raw.rpartition(b"\n")
    if tail.strip():
        warnings.warn(f"{path}: dropping truncated last index line (interrupted writer)", stacklevel=3)
    entries = []
    for number, line in enumerate(body.split(b"\n") if newline else [], start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SceneError(
                f"{path}: line {number} is not valid JSON ({exc.msg}); only a torn last line is tolerated"
            ) from exc
    return entries, len(body) + len(newline)


class SceneWriter:
    """Crash-safe, append-only writer of a scene directory.

    Creating a writer on a directory that already holds a scene resumes it (same meta required): a torn last index
    line is cut off and new frames are appended. Use as a context manager or call `close()`.
    """

    def __init__(self, root: str | Path, meta: SceneMeta) -> None:
        self.root = Path(root)
        self.meta = meta
        self.root.mkdir(parents=True, exist_ok=True)
        meta_path = self.root / META_FILE
        if meta_path.exists():
            existing = SceneMeta.from_json(json.loads(meta_path.read_text()))
            if existing != meta:
                raise SceneError(f"{self.root} already holds a scene with different meta; use a new directory")
        else:
            write_atomic(meta_path, lambda handle: handle.write((json.dumps(meta.to_json(), indent=2) + "\n").encode()))
        index_path = self.root / INDEX_FILE
        entries, good_end = _read_index(index_path)
        self._ids = {str(entry.get("id")) for entry in entries}
        if index_path.exists() and index_path.stat().st_size != good_end:
            os.truncate(index_path, good_end)  # cut a torn tail before appending after it
        self._index = open(index_path, "ab")
        self._default_K = np.asarray(meta.K, dtype=np.float64)

    def add_frame(
        self,
        frame_id: str,
        rgb: np.ndarray,
        c2w: np.ndarray,
        timestamp_ns: int,
        depth: np.ndarray | None = None,
        K: np.ndarray | None = None,
    ) -> Frame:
        """Validate and append one frame; nothing is written if any input is invalid.

        `rgb: [H, W, 3]` uint8, `c2w: [4, 4]` camera-to-world (OpenCV camera), `depth: [H, W]` float metres
        (0/NaN = no depth), `K: [3, 3]` (defaults to the scene's).
        """
        where = f"frame {frame_id!r}"
        if not _FRAME_ID.match(frame_id):
            raise SceneError(f"{where}: ids may only contain letters, digits, '_', '-', '.' (they name files)")
        if frame_id in self._ids:
            raise SceneError(f"{where}: id already in this scene; frame ids must be unique")
        size = (self.meta.height, self.meta.width)
        if rgb.dtype != np.uint8 or rgb.shape != (*size, 3):
            raise SceneError(
                f"{where}: rgb must be uint8 {size[0]}x{size[1]}x3 as in scene.json, got {rgb.dtype} {rgb.shape}"
            )
        if depth is not None and depth.shape != size:
            raise SceneError(f"{where}: depth must be {size[0]}x{size[1]} (aligned to rgb), got {depth.shape}")
        K = self._default_K if K is None else np.asarray(K, dtype=np.float64)
        c2w = np.asarray(c2w, dtype=np.float64)
        _check_intrinsics(K, where)
        _check_pose(c2w, where)
        frame = Frame(frame_id, int(timestamp_ns), f"rgb/{frame_id}.png", None, K, c2w)
        save_png_atomic(self.root / frame.rgb_path, rgb)
        if depth is not None:
            frame.depth_path = f"depth/{frame_id}.png"
            save_png_atomic(self.root / frame.depth_path, encode_depth(depth, self.meta.depth_scale))
        self._index.write((json.dumps(frame.to_json()) + "\n").encode())
        self._index.flush()
        os.fsync(self._index.fileno())
        self._ids.add(frame_id)
        return frame

    def close(self) -> None:
        self._index.close()

    def __enter__(self) -> "SceneWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Scene:
    """A loaded scene: `meta`, `frames` (ordered as recorded) and image access relative to `root`."""

    root: Path
    meta: SceneMeta
    frames: list[Frame] = field(default_factory=list)

    @classmethod
    def load(cls, root: str | Path) -> "Scene":
        """Read a scene directory; validates poses/intrinsics and that every image exists with the scene's size."""
        root = Path(root)
        meta_path = root / META_FILE
        if not meta_path.exists():
            raise SceneError(f"{root} is not a scene directory: {META_FILE} missing")
        meta = SceneMeta.from_json(json.loads(meta_path.read_text()))
        entries, _ = _read_index(root / INDEX_FILE)
        frames = [Frame.from_json(entry, f"{root / INDEX_FILE} entry {i}") for i, entry in enumerate(entries)]
        scene = cls(root, meta, frames)
        scene.validate()
        return scene

    @classmethod
    def from_colmap(
        cls, root: str | Path, model_dir: str = "sparse/0", images_dir: str = "images", world_frame: str = "colmap"
    ) -> "Scene":
        """Scene of a COLMAP dataset `root/{images_dir, model_dir}` (text model, undistorted PINHOLE cameras).

        Frames are ordered by image name; timestamps are the frame indices (COLMAP carries no times).
        """
        root = Path(root)
        model = load_colmap_text(root / model_dir)
        sizes = {(cam.width, cam.height) for cam in model.cameras.values()}
        if len(sizes) != 1:
            raise SceneError(f"COLMAP cameras have different image sizes {sorted(sizes)}: resize to one size first")
        ((width, height),) = sizes
        frames = [
            Frame(
                Path(image.name).stem,
                i,
                f"{images_dir}/{image.name}",
                None,
                colmap_intrinsics(model.cameras[image.camera_id]),
                image.c2w,
            )
            for i, image in enumerate(model.images)
        ]
        meta = SceneMeta(width=width, height=height, K=frames[0].K if frames else np.eye(3), world_frame=world_frame)
        scene = cls(root, meta, frames)
        scene.validate()
        return scene

    def validate(self) -> None:
        if not self.frames:
            raise SceneError(f"{self.root}: scene has no frames (no posed images); record at least one posed frame")
        ids = [frame.frame_id for frame in self.frames]
        if len(set(ids)) != len(ids):
            raise SceneError(f"{self.root}: duplicate frame ids in the index")
        for frame in self.frames:
            for rel in (frame.rgb_path, frame.depth_path):
                if rel is None:
                    continue
                path = self.root / rel
                if not path.exists():
                    raise SceneError(f"frame {frame.frame_id!r}: image {path} missing")
                with Image.open(path) as image:
                    if image.size != (self.meta.width, self.meta.height):
                        raise SceneError(
                            f"frame {frame.frame_id!r}: {rel} is {image.size[0]}x{image.size[1]}, the scene is "
                            f"{self.meta.width}x{self.meta.height}; resize it (and scale K) or drop the frame"
                        )

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def world_frame(self) -> str:
        return self.meta.world_frame

    @property
    def Ks(self) -> np.ndarray:
        """`[n, 3, 3]` float64 intrinsics."""
        return np.stack([frame.K for frame in self.frames])

    @property
    def c2w(self) -> np.ndarray:
        """`[n, 4, 4]` float64 camera-to-world poses (OpenCV camera)."""
        return np.stack([frame.c2w for frame in self.frames])

    @property
    def timestamps_ns(self) -> np.ndarray:
        """`[n]` int64 frame stamps."""
        return np.array([frame.timestamp_ns for frame in self.frames], dtype=np.int64)

    def image(self, index: int) -> np.ndarray:
        """`[H, W, 3]` uint8 RGB of frame `index`."""
        with Image.open(self.root / self.frames[index].rgb_path) as image:
            return np.asarray(image.convert("RGB"))

    def images(self) -> np.ndarray:
        """`[n, H, W, 3]` uint8 RGB of all frames."""
        return np.stack([self.image(i) for i in range(len(self))])

    def depth(self, index: int) -> np.ndarray | None:
        """`[H, W]` float32 metres of frame `index` (0 = no depth), or None if the frame has no depth."""
        rel = self.frames[index].depth_path
        if rel is None:
            return None
        with Image.open(self.root / rel) as image:
            return np.asarray(image).astype(np.float32) * np.float32(self.meta.depth_scale)

    def depths(self) -> np.ndarray | None:
        """`[n, H, W]` float32 metres, or None unless every frame has depth."""
        if any(frame.depth_path is None for frame in self.frames):
            return None
        return np.stack([self.depth(i) for i in range(len(self))])


# ---------------------------------------------------------------------------------------------------------- COLMAP


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
    name: str
    c2w: np.ndarray  # [4, 4] camera-to-world (COLMAP stores world-to-camera; OpenCV camera convention)


@dataclass
class ColmapModel:
    """A COLMAP sparse model. `xyz: [P, 3]` float64, `rgb: [P, 3]` uint8, `errors: [P]` reprojection errors."""

    cameras: dict[int, ColmapCamera]
    images: list[ColmapImage]
    xyz: np.ndarray
    rgb: np.ndarray
    errors: np.ndarray


def _colmap_lines(path: Path) -> list[str]:
    if not path.exists():
        raise SceneError(
            f"COLMAP text model incomplete: {path} missing (export with `colmap model_converter --output_type TXT`)"
        )
    return [line.rstrip("\n") for line in path.read_text().splitlines() if not line.startswith("#")]


def load_colmap_text(model_dir: str | Path) -> ColmapModel:
    """Read `cameras.txt`, `images.txt`, `points3D.txt` of a COLMAP text model directory."""
    model_dir = Path(model_dir)
    try:
        return _parse_colmap_text(model_dir)
    except (ValueError, IndexError) as exc:
        if isinstance(exc, SceneError):
            raise
        raise SceneError(
            f"{model_dir}: malformed COLMAP text model ({exc}); re-export it with model_converter"
        ) from exc


def _parse_colmap_text(model_dir: Path) -> ColmapModel:
    cameras = {}
    for line in _colmap_lines(model_dir / "cameras.txt"):
        if not line.strip():
            continue
        cam_id, model, width, height, *params = line.split()
        cameras[int(cam_id)] = ColmapCamera(
            int(cam_id), model, int(width), int(height), np.array(params, dtype=np.float64)
        )
    image_lines = _colmap_lines(model_dir / "images.txt")
    images = []
    # Each image takes two lines; the second (its 2D points) may be empty, so blank lines cannot simply be skipped.
    for header in image_lines[0::2]:
        if not header.strip():
            continue
        fields = header.split()
        if len(fields) < 10:
            raise SceneError(f"{model_dir / 'images.txt'}: image line needs 10 fields, got {header!r}")
        qvec, tvec = np.array(fields[1:5], dtype=np.float64), np.array(fields[5:8], dtype=np.float64)
        w2c = make_pose(quat2mat(qvec), tvec)  # COLMAP quaternions are (w, x, y, z), as transforms3d expects
        image = ColmapImage(int(fields[0]), int(fields[8]), " ".join(fields[9:]), invert_pose(w2c))
        if image.camera_id not in cameras:
            raise SceneError(f"COLMAP image {image.name} refers to camera {image.camera_id} missing from cameras.txt")
        images.append(image)
    images.sort(key=lambda image: image.name)
    rows = [line.split() for line in _colmap_lines(model_dir / "points3D.txt") if line.strip()]
    xyz = np.array([row[1:4] for row in rows], dtype=np.float64).reshape(-1, 3)
    rgb = np.array([row[4:7] for row in rows], dtype=np.uint8).reshape(-1, 3)
    errors = np.array([row[7] for row in rows], dtype=np.float64)
    return ColmapModel(cameras, images, xyz, rgb, errors)


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


# ------------------------------------------------------------------------------------------- Gaussian initialisation


def _subsample(xyz: np.ndarray, rgb: np.ndarray, max_points: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if max_points is not None and len(xyz) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(xyz), size=max_points, replace=False))
        xyz, rgb = xyz[keep], rgb[keep]
    return xyz.astype(np.float32), rgb.astype(np.float32)


def init_points_from_colmap(
    model: ColmapModel, max_points: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Initial Gaussian centres from COLMAP points3D: `(xyz: [P, 3] float32, rgb: [P, 3] float32 in [0, 1])`."""
    if len(model.xyz) == 0:
        raise SceneError("COLMAP model has no 3D points; initialise from depth or run triangulation first")
    return _subsample(model.xyz, model.rgb / 255.0, max_points, seed)


def init_points_from_depth(
    scene: Scene, stride: int = 4, max_points: int | None = 200_000, seed: int = 0, views=None
) -> tuple[np.ndarray, np.ndarray]:
    """Back-project every `stride`-th pixel with valid depth of every frame (or of the frame indices `views`) into
    the world frame.

    Returns `(xyz: [P, 3] float32 world metres, rgb: [P, 3] float32 in [0, 1])`, randomly subsampled (seeded) to
    `max_points`.
    """
    if stride < 1:
        raise SceneError(f"stride must be >= 1, got {stride}")
    all_xyz, all_rgb = [], []
    for i in range(len(scene.frames)) if views is None else views:
        frame, depth = scene.frames[i], scene.depth(i)
        if depth is None:
            continue
        depth = depth[::stride, ::stride]
        v, u = np.nonzero(depth > 0)
        z = depth[v, u].astype(np.float64)
        u, v = u * stride, v * stride
        K = frame.K
        cam = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], axis=1)
        all_xyz.append(cam @ frame.c2w[:3, :3].T + frame.c2w[:3, 3])
        all_rgb.append(scene.image(i)[v, u] / 255.0)
    if not all_xyz or sum(len(x) for x in all_xyz) == 0:
        raise SceneError(f"{scene.root}: no frame has valid depth; initialise from a COLMAP model instead")
    return _subsample(np.concatenate(all_xyz), np.concatenate(all_rgb), max_points, seed)
