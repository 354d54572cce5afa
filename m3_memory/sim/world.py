"""Tabletop world in pybullet: objects with exact ground truth, rendered by pybullet's CPU TinyRenderer.

Objects are real textured meshes from `pybullet_data` (the yellow rubber duck, a mug, a soccer ball), boxes and
billboards textured with real photographs from `skimage.data`, and solid-colour primitives. Every object is a
visual-only body whose frame is the mesh frame, so its ground-truth box comes from its own vertices, not from a
collision approximation.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pybullet
import pybullet_data
import skimage.data
from PIL import Image
from scipy.spatial.transform import Rotation

TABLE_TOP_Z = 0.626  # metres, top of pybullet_data/table/table.urdf at the origin
TABLE_HALF_XY = (0.75, 0.5)
NEAR, FAR = 0.05, 20.0
MAX_DEPTH = 8.0  # metres; beyond this the synthetic sensor reports no depth (0), like a RealSense


@dataclass(frozen=True)
class ObjectSpec:
    """A catalogue object. `size`: mesh max extent / box edge / sphere diameter / billboard height, metres.

    `kind`: mesh | photo_box | billboard | sphere | box | cylinder; `source`: mesh file in pybullet_data or
    `skimage.data` photo name; `upright_euler`: rotation (xyz, rad) that stands a mesh on its base.
    """

    name: str
    phrases: tuple[str, ...]
    kind: str
    size: float
    source: str = ""
    rgba: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    upright_euler: tuple[float, float, float] = (0.0, 0.0, 0.0)


CATALOG: dict[str, ObjectSpec] = {
    spec.name: spec
    for spec in (
        ObjectSpec(
            "yellow bath duck",
            ("yellow bath duck", "rubber duck", "yellow duck toy"),
            "mesh",
            0.16,
            "duck.obj",
            upright_euler=(np.pi / 2, 0.0, 0.0),
        ),
        ObjectSpec("red mug", ("red mug", "mug", "cup"), "mesh", 0.12, "objects/mug.obj", rgba=(0.85, 0.15, 0.15, 1.0)),
        ObjectSpec("soccer ball", ("soccer ball", "football"), "mesh", 0.14, "soccerball.obj"),
        ObjectSpec("cat photo box", ("cat", "a photo of a cat", "tabby cat"), "photo_box", 0.12, "chelsea"),
        ObjectSpec("coffee picture", ("cup of coffee", "coffee", "a picture of coffee"), "billboard", 0.16, "coffee"),
        ObjectSpec("rocket picture", ("rocket", "a rocket launch"), "billboard", 0.18, "rocket"),
        ObjectSpec("astronaut picture", ("astronaut", "a person in a space suit"), "billboard", 0.18, "astronaut"),
        ObjectSpec("yellow ball", ("yellow ball", "yellow sphere"), "sphere", 0.08, rgba=(1.0, 0.85, 0.05, 1.0)),
        ObjectSpec("red cube", ("red cube", "red block"), "box", 0.07, rgba=(0.85, 0.1, 0.1, 1.0)),
        ObjectSpec("blue cylinder", ("blue cylinder", "blue can"), "cylinder", 0.12, rgba=(0.1, 0.3, 0.9, 1.0)),
    )
}


@dataclass
class PlacedObject:
    """An object in the world. `center`, `bbox_min`, `bbox_max`: [3] world metres (axis-aligned visual bounds)."""

    index: int  # 1-based value in segmentation masks
    spec: ObjectSpec
    body_id: int
    center: np.ndarray
    bbox_min: np.ndarray
    bbox_max: np.ndarray

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "name": self.spec.name,
            "phrases": list(self.spec.phrases),
            "kind": self.spec.kind,
            "source": self.spec.source,
            "center": self.center.tolist(),
            "bbox_min": self.bbox_min.tolist(),
            "bbox_max": self.bbox_max.tolist(),
            "body_id": self.body_id,
        }


def _obj_vertices(path: Path) -> np.ndarray:
    """`[V, 3]` vertex positions of a Wavefront OBJ file."""
    rows = [line.split()[1:4] for line in path.read_text().splitlines() if line.startswith("v ")]
    return np.array(rows, dtype=np.float64)


def _photo_box_mesh(half: np.ndarray) -> tuple[list, list, list]:
    """Box mesh with half extents `half: [3]` whose four sides show a whole texture upright (seen from outside).

    Returns (vertices [24][3], triangle indices [36], uvs [24][2]) as pybullet's createVisualShape takes them.
    """
    up = np.array([0.0, 0.0, 1.0])
    vertices, indices, uvs = [], [], []
    normals = [np.array(n, dtype=float) for n in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))]
    for normal in normals:
        face_up = up if abs(normal[2]) < 0.5 else np.array([1.0, 0.0, 0.0])
        right = np.cross(-normal, face_up)
        centre = normal * half
        half_w, half_h = np.abs(right) @ half, np.abs(face_up) @ half
        base = len(vertices)
        # Corners TL, BL, BR, TR as seen from outside; the texture origin is its bottom-left.
        for su, sv, uv in ((-1, 1, (0, 1)), (-1, -1, (0, 0)), (1, -1, (1, 0)), (1, 1, (1, 1))):
            vertices.append((centre + su * half_w * right + sv * half_h * face_up).tolist())
            uvs.append(list(uv))
        indices += [base, base + 1, base + 2, base, base + 2, base + 3]
    return vertices, indices, uvs


@dataclass
class TabletopWorld:
    """A pybullet DIRECT world with a floor, a table and placed objects; call `close()` when done."""

    client: int = field(default_factory=lambda: pybullet.connect(pybullet.DIRECT))
    objects: list[PlacedObject] = field(default_factory=list)
    _texdir: tempfile.TemporaryDirectory = field(default_factory=tempfile.TemporaryDirectory)

    def __post_init__(self) -> None:
        data = Path(pybullet_data.getDataPath())
        pybullet.loadURDF(str(data / "plane.urdf"), physicsClientId=self.client)
        pybullet.loadURDF(str(data / "table/table.urdf"), physicsClientId=self.client)

    def close(self) -> None:
        pybullet.disconnect(physicsClientId=self.client)
        self._texdir.cleanup()

    def _texture(self, photo: str) -> int:
        path = Path(self._texdir.name) / f"{photo}.png"
        if not path.exists():
            image = Image.fromarray(getattr(skimage.data, photo)()).convert("RGB")
            image.thumbnail((256, 256))
            image.save(path)
        return pybullet.loadTexture(str(path), physicsClientId=self.client)

    def _shape(self, spec: ObjectSpec) -> tuple[int, np.ndarray, int | None]:
        """Create the visual shape -> (shape id, local hull points [K, 3] in the body frame, texture id or None)."""
        cid = self.client
        if spec.kind == "mesh":
            path = Path(pybullet_data.getDataPath()) / spec.source
            raw = _obj_vertices(path) @ Rotation.from_euler("xyz", spec.upright_euler).as_matrix().T
            scale = spec.size / np.max(raw.max(0) - raw.min(0))
            # The upright rotation is applied to the body, so the shape itself keeps the file's axes.
            shape = pybullet.createVisualShape(
                pybullet.GEOM_MESH,
                fileName=str(path),
                meshScale=[scale] * 3,
                rgbaColor=list(spec.rgba),
                physicsClientId=cid,
            )
            return shape, raw * scale, None
        if spec.kind in ("photo_box", "billboard"):
            photo = getattr(skimage.data, spec.source)()
            aspect = photo.shape[1] / photo.shape[0]
            if spec.kind == "photo_box":
                half = np.full(3, spec.size / 2)
            else:  # a thin upright panel, photo on both large faces
                half = np.array([0.004, spec.size * aspect / 2, spec.size / 2])
            vertices, indices, uvs = _photo_box_mesh(half)
            shape = pybullet.createVisualShape(
                pybullet.GEOM_MESH, vertices=vertices, indices=indices, uvs=uvs, physicsClientId=cid
            )
            corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * half
            return shape, corners, self._texture(spec.source)
        if spec.kind == "sphere":
            radius = spec.size / 2
            shape = pybullet.createVisualShape(
                pybullet.GEOM_SPHERE, radius=radius, rgbaColor=list(spec.rgba), physicsClientId=cid
            )
            # A sphere's axis-aligned box is the same under any yaw: its six axis points bound it exactly.
            return shape, np.vstack([np.eye(3), -np.eye(3)]) * radius, None
        if spec.kind == "box":
            half = np.full(3, spec.size / 2)
            shape = pybullet.createVisualShape(
                pybullet.GEOM_BOX, halfExtents=half.tolist(), rgbaColor=list(spec.rgba), physicsClientId=cid
            )
            corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * half
            return shape, corners, None
        if spec.kind == "cylinder":
            radius, height = spec.size * 0.3, spec.size
            shape = pybullet.createVisualShape(
                pybullet.GEOM_CYLINDER, radius=radius, length=height, rgbaColor=list(spec.rgba), physicsClientId=cid
            )
            angle = np.linspace(0, 2 * np.pi, 72, endpoint=False)
            ring = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
            hull = np.vstack([np.column_stack([ring, np.full(72, z)]) for z in (-height / 2, height / 2)])
            return shape, hull, None
        raise ValueError(f"unknown object kind {spec.kind!r}")

    def add(self, spec: ObjectSpec, xy: np.ndarray, yaw: float) -> PlacedObject:
        """Stand `spec` on the table top, its box centred at `xy: [2]`, turned by `yaw` (rad) about world z."""
        shape, hull, texture = self._shape(spec)
        yaw_rot = Rotation.from_euler("z", 0.0 if spec.kind == "sphere" else yaw)
        upright = Rotation.from_euler("xyz", spec.upright_euler) if spec.kind == "mesh" else Rotation.identity()
        rotation = yaw_rot * upright
        local = hull @ yaw_rot.as_matrix().T  # hull points are already upright in the body's un-yawed frame
        lo, hi = local.min(0), local.max(0)
        position = np.array([xy[0] - (lo[0] + hi[0]) / 2, xy[1] - (lo[1] + hi[1]) / 2, TABLE_TOP_Z - lo[2]])
        body = pybullet.createMultiBody(
            0.0,
            -1,
            shape,
            basePosition=position.tolist(),
            baseOrientation=rotation.as_quat().tolist(),
            physicsClientId=self.client,
        )
        if texture is not None:
            pybullet.changeVisualShape(
                body, -1, textureUniqueId=texture, rgbaColor=[1, 1, 1, 1], physicsClientId=self.client
            )
        placed = PlacedObject(len(self.objects) + 1, spec, body, position + (lo + hi) / 2, position + lo, position + hi)
        self.objects.append(placed)
        return placed

    def render(
        self, c2w: np.ndarray, K: np.ndarray, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Render an OpenCV camera `c2w: [4, 4]`, `K: [3, 3]`.

        Returns `rgb: [H, W, 3]` uint8, `depth: [H, W]` float32 metric z-depth (0 = none), `seg: [H, W]` uint8
        object index (0 = background, k = `objects[k - 1]`).
        """
        view = np.linalg.inv(c2w @ np.diag([1.0, -1.0, -1.0, 1.0]))  # OpenGL camera: y up, looking down -z
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        proj = np.zeros((4, 4))
        # TinyRenderer samples column u at NDC x = 2u/W - 1 and output row v at NDC y = 1 - 2(v + 1)/H (rows are
        # flipped from GL's): these offsets make that sample the OpenCV pixel (u, v) of K (checked by back-projection).
        proj[0, 0], proj[0, 2] = 2 * fx / width, 1 - 2 * cx / width
        proj[1, 1], proj[1, 2] = 2 * fy / height, 2 * (cy + 1) / height - 1
        proj[2, 2], proj[2, 3] = -(FAR + NEAR) / (FAR - NEAR), -2 * FAR * NEAR / (FAR - NEAR)
        proj[3, 2] = -1.0
        _, _, rgba, zbuf, seg = pybullet.getCameraImage(
            width,
            height,
            viewMatrix=view.T.ravel().tolist(),
            projectionMatrix=proj.T.ravel().tolist(),
            renderer=pybullet.ER_TINY_RENDERER,
            shadow=0,
            lightDirection=[0.4, -0.6, 1.0],
            lightAmbientCoeff=0.6,
            lightDiffuseCoeff=0.5,
            lightSpecularCoeff=0.05,
            physicsClientId=self.client,
        )
        rgb = np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)[..., :3].copy()
        zbuf = np.asarray(zbuf, dtype=np.float64).reshape(height, width)
        depth = FAR * NEAR / (FAR - (FAR - NEAR) * zbuf)
        depth = np.where(depth < MAX_DEPTH, depth, 0.0).astype(np.float32)
        seg = np.asarray(seg).reshape(height, width)
        labels = np.zeros((height, width), dtype=np.uint8)
        for obj in self.objects:
            labels[seg == obj.body_id] = obj.index
        return rgb, depth, labels
