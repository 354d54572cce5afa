"""The scene directory format: what the recorder and `m3 import-colmap` write and the trainer reads.

Scene directory layout (format version 1)::

    scene.json      meta: version, world frame, camera model, image size, default intrinsics K, depth scale
    frames.jsonl    append-only index, one JSON object per frame:
                    {"id", "timestamp_ns", "rgb", "depth" (or null), "K" [3][3], "c2w" [4][4]}
    rgb/<id>.png    uint8 RGB
    depth/<id>.png  uint16 depth in units of `depth_scale` metres (RealSense aligned-depth style, 0 = no depth)
    points3D.npz    optional initial points (a COLMAP import's points3D): "xyz" [P, 3] float64 world, "rgb" [P, 3] uint8

A frame without depth has `"depth": null`: a COLMAP import has none (its scale is arbitrary unless aligned to the
robot's poses), so such a scene trains with `init: colmap` from `points3D.npz`. Poses are camera-to-world 4x4 matrices
in the OpenCV camera convention (x right, y down, z forward), the world being the frame named `world_frame`; K follows
the pixel convention of `m3_memory.core.geometry.backproject_pixels`. The writer is crash-safe: image files are
written to a temporary name and renamed, then one index line is appended and fsynced, so a killed writer leaves a
loadable scene of every completed frame (a torn last line is dropped with a warning on load). Arrays returned here
are numpy.
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

from m3_memory.core.atomic import write_atomic
from m3_memory.core.geometry import is_rigid

SCENE_FORMAT_VERSION = 1
META_FILE = "scene.json"
INDEX_FILE = "frames.jsonl"
POINTS_FILE = "points3D.npz"
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


@dataclass
class ScenePoints:
    """Initial points of a scene: `xyz: [P, 3]` float64 in the world frame, `rgb: [P, 3]` uint8."""

    xyz: np.ndarray
    rgb: np.ndarray

    def __post_init__(self) -> None:
        self.xyz = np.asarray(self.xyz, dtype=np.float64)
        self.rgb = np.asarray(self.rgb)
        if self.xyz.ndim != 2 or self.xyz.shape[1] != 3 or self.rgb.shape != self.xyz.shape:
            raise SceneError(f"points need xyz [P, 3] and rgb [P, 3], got {self.xyz.shape} and {self.rgb.shape}")
        if self.rgb.dtype != np.uint8:
            raise SceneError(f"point colours must be uint8, got {self.rgb.dtype}")
        if not np.all(np.isfinite(self.xyz)):
            raise SceneError("points have NaN/inf coordinates")


def write_points(root: str | Path, points: ScenePoints) -> Path:
    """Write `points` as the scene's `points3D.npz` (atomically)."""
    return write_atomic(Path(root) / POINTS_FILE, lambda handle: np.savez(handle, xyz=points.xyz, rgb=points.rgb))


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

    def points(self) -> ScenePoints | None:
        """The scene's `points3D.npz`, or None when it has none (a recorded scene: its points come from depth)."""
        path = self.root / POINTS_FILE
        if not path.exists():
            return None
        try:
            with np.load(path) as data:
                return ScenePoints(data["xyz"], data["rgb"])
        except (OSError, KeyError, ValueError) as exc:
            raise SceneError(f"{path} unreadable ({exc}); re-import the scene (`m3 import-colmap`)") from exc
