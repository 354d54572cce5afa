"""ROS messages ↔ numpy arrays and 4×4 poses (the only place that knows both sides' layouts)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from geometry_msgs.msg import Pose, Transform
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from tf2_msgs.msg import TFMessage

from m3_memory.core.geometry import pose_from_xyzw, xyzw_from_pose
from m3_memory.core.transforms import TransformBuffer


class ImageEncodingError(ValueError):
    """An image whose encoding or layout we cannot read."""


def stamp_ns(stamp) -> int:
    """builtin_interfaces/Time → integer nanoseconds (exact, unlike float seconds at epoch scale)."""
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def transform_to_matrix(transform: Transform) -> np.ndarray:
    """`[4, 4]` pose of a geometry_msgs/Transform; ValueError for a non-finite translation or a quaternion that
    cannot be normalised (zero or non-finite)."""
    r, t = transform.rotation, transform.translation
    quat, trans = np.array([r.x, r.y, r.z, r.w]), np.array([t.x, t.y, t.z])
    if not np.all(np.isfinite(trans)):
        raise ValueError(f"translation {trans.tolist()} is not finite")
    norm = np.linalg.norm(quat)
    if not (np.isfinite(norm) and norm > 1e-6):
        raise ValueError(f"rotation quaternion (x y z w) {quat.tolist()} cannot be normalised")
    return pose_from_xyzw(quat, trans)


@dataclass
class TransformIntake:
    """What one TF message did to a buffer: why each skipped transform was skipped, and how far (ns) time jumped
    back when a transform cleared the buffer's history (0: no jump)."""

    rejected: list[str] = field(default_factory=list)
    jumped_back_ns: int = 0


def add_transforms(buffer: TransformBuffer, msg: TFMessage, static: bool, logger) -> TransformIntake:
    """Feed a /tf or /tf_static message into `buffer`; malformed transforms are skipped, and logged with a jump back in
    time (the buffer cleared its history) unless `logger` is None (the caller logs from the returned intake)."""
    intake = TransformIntake()
    for t in msg.transforms:
        parent, child, stamp = t.header.frame_id, t.child_frame_id, stamp_ns(t.header.stamp)
        try:
            jumped = buffer.set_transform(parent, child, stamp, transform_to_matrix(t.transform), static=static)
        except ValueError as exc:
            problem = f"transform {parent} → {child} at {stamp * 1e-9:.3f} s: {exc}"
            intake.rejected.append(problem)
            if logger is not None:
                logger.warning(f"ignoring {problem}", throttle_duration_sec=2.0)
            continue
        if jumped:
            intake.jumped_back_ns = max(intake.jumped_back_ns, jumped)
            if logger is not None:
                logger.warning(f"time jumped back {jumped * 1e-9:.3f} s (transform {parent} → {child} at "
                               f"{stamp * 1e-9:.3f} s): cleared the transform history, as tf2 does")
    return intake


def pose_to_matrix(pose: Pose) -> np.ndarray:
    """`[4, 4]` of a geometry_msgs/Pose."""
    q, p = pose.orientation, pose.position
    return pose_from_xyzw([q.x, q.y, q.z, q.w], [p.x, p.y, p.z])


def matrix_to_pose(matrix: np.ndarray) -> Pose:
    """geometry_msgs/Pose of a rigid `[4, 4]`."""
    quat, trans = xyzw_from_pose(matrix)
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = (float(v) for v in trans)
    pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = (float(v) for v in quat)
    return pose


def camera_info_K(info: CameraInfo) -> np.ndarray:
    """Intrinsics `K: [3, 3]`."""
    return np.asarray(info.k, dtype=np.float64).reshape(3, 3)


def _pixels(msg: Image, dtype, channels: int) -> np.ndarray:
    if msg.width <= 0 or msg.height <= 0:
        raise ImageEncodingError(f"{msg.encoding} image size {msg.width}x{msg.height} must be positive")
    itemsize = np.dtype(dtype).itemsize
    row = msg.width * channels * itemsize
    if msg.step < row or len(msg.data) < msg.step * msg.height:
        raise ImageEncodingError(f"{msg.encoding} image {msg.width}x{msg.height}: step {msg.step} / {len(msg.data)} "
                                 f"bytes do not hold the pixels")
    raw = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(msg.height, msg.step)[:, :row]
    order = ">" if msg.is_bigendian else "<"
    values = np.ascontiguousarray(raw).view(np.dtype(dtype).newbyteorder(order) if itemsize > 1 else dtype)
    return values.reshape(msg.height, msg.width, channels) if channels > 1 else values.reshape(msg.height, msg.width)


def image_to_rgb(msg: Image) -> np.ndarray:
    """Colour image → `[H, W, 3]` uint8 RGB (rgb8, bgr8, rgba8, bgra8)."""
    layouts = {"rgb8": (3, [0, 1, 2]), "bgr8": (3, [2, 1, 0]), "rgba8": (4, [0, 1, 2]), "bgra8": (4, [2, 1, 0])}
    if msg.encoding not in layouts:
        raise ImageEncodingError(f"colour encoding {msg.encoding!r} unsupported; use one of {sorted(layouts)}")
    channels, order = layouts[msg.encoding]
    return np.ascontiguousarray(_pixels(msg, np.uint8, channels)[..., order])


def image_to_depth(msg: Image) -> np.ndarray:
    """Depth image → `[H, W]` float32 metres; 16UC1 is millimetres (RealSense), 32FC1 metres; 0/NaN = no depth."""
    if msg.encoding in ("16UC1", "mono16"):
        return _pixels(msg, np.uint16, 1).astype(np.float32) * 0.001
    if msg.encoding == "32FC1":
        depth = _pixels(msg, np.float32, 1).astype(np.float32)
        return np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0)
    raise ImageEncodingError(f"depth encoding {msg.encoding!r} unsupported; use 16UC1 (mm) or 32FC1 (m)")


# compressed_depth_image_transport's header before the PNG: int32 format (0 = inverse depth) and two float32
# quantisation parameters (depth = A / (q - B) for 32FC1 sources; unused for 16UC1), in the publisher's byte order
# (little endian on every platform ROS ships for).
_DEPTH_HEADER = np.dtype([("format", "<i4"), ("quant", "<f4", (2,))])


def _imdecode(data, mode: str, what: str) -> np.ndarray:
    """OpenCV's decode of JPEG/PNG bytes `data` with `mode` ("IMREAD_COLOR": `[H, W, 3]` BGR; "IMREAD_UNCHANGED")."""
    try:
        import cv2
    except ImportError as exc:
        raise ImageEncodingError(f"decoding {what} needs OpenCV (pip install opencv-python-headless)") from exc
    buffer = np.frombuffer(bytes(data), dtype=np.uint8)
    image = cv2.imdecode(buffer, getattr(cv2, mode)) if buffer.size else None
    if image is None or image.size == 0:
        raise ImageEncodingError(f"{what}: {buffer.size} bytes are not a decodable image")
    return image


def compressed_to_rgb(msg: CompressedImage) -> np.ndarray:
    """compressed_image_transport colour (`format` e.g. "rgb8; jpeg compressed bgr8", "png") → `[H, W, 3]` uint8 RGB.
    OpenCV decodes JPEG/PNG to BGR whatever the source encoding was (the plugin compresses colour as bgr8)."""
    if "compressedDepth" in msg.format:
        raise ImageEncodingError(f"colour topic carries a compressedDepth image ({msg.format!r}): use the colour "
                                 "stream's compressed topic")
    image = _imdecode(msg.data, "IMREAD_COLOR", f"compressed colour image ({msg.format!r})")
    return np.ascontiguousarray(image[..., ::-1])


def compressed_to_depth(msg: CompressedImage) -> np.ndarray:
    """Compressed depth → `[H, W]` float32 metres, 0 = no depth: compressed_depth_image_transport's `format`
    "16UC1; compressedDepth png" (a 12-byte header, then a 16-bit PNG of millimetres) or "32FC1; compressedDepth png"
    (the PNG holds quantised inverse depth q: depth = A / (q - B), q = 0 no depth), or compressed_image_transport's
    16-bit PNG ("16UC1; png compressed 16UC1")."""
    encoding, _, method = (part.strip() for part in msg.format.partition(";"))
    data = msg.data
    if "compressedDepth" in method or not method:  # no ';' at all: the oldest compressedDepth publishers
        if method not in ("", "compressedDepth", "compressedDepth png"):
            raise ImageEncodingError(f"compressedDepth format {msg.format!r} unsupported; only png (the default)")
        if len(data) <= _DEPTH_HEADER.itemsize:
            raise ImageEncodingError(f"compressedDepth image of {len(data)} bytes has no data after its "
                                     f"{_DEPTH_HEADER.itemsize}-byte header")
        header = np.frombuffer(bytes(data[:_DEPTH_HEADER.itemsize]), dtype=_DEPTH_HEADER)[0]
        data = data[_DEPTH_HEADER.itemsize:]
    elif "png" not in method:
        raise ImageEncodingError(f"compressed depth format {msg.format!r} unsupported: depth must be PNG "
                                 "(JPEG would change the distances)")
    q = _imdecode(data, "IMREAD_UNCHANGED", f"compressed depth image ({msg.format!r})")
    if q.dtype != np.uint16 or q.ndim != 2:
        raise ImageEncodingError(f"compressed depth PNG must be one 16-bit channel, got {q.dtype} "
                                 f"{'x'.join(map(str, q.shape))}")
    if encoding in ("16UC1", "mono16"):
        return q.astype(np.float32) * 0.001
    if encoding == "32FC1" and "compressedDepth" in method:
        a, b = (float(v) for v in header["quant"])
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = np.where(q > 0, a / (q.astype(np.float32) - b), 0.0).astype(np.float32)
        return np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0)
    raise ImageEncodingError(f"compressed depth source encoding {encoding!r} unsupported; use 16UC1 (mm) or 32FC1 (m)")


def color_to_rgb(msg: Image | CompressedImage) -> np.ndarray:
    """Either colour message → `[H, W, 3]` uint8 RGB."""
    return compressed_to_rgb(msg) if isinstance(msg, CompressedImage) else image_to_rgb(msg)


def depth_to_metres(msg: Image | CompressedImage) -> np.ndarray:
    """Either depth message → `[H, W]` float32 metres."""
    return compressed_to_depth(msg) if isinstance(msg, CompressedImage) else image_to_depth(msg)
