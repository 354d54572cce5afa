"""Write the demo recording as a rosbag2 (MCAP) bag with the topics a RealSense + LiDAR + arm robot publishes.

Messages are built with the rosbags typestore of ROS 2 Kilted and written in receive-time order; each message's
bag time is its header stamp plus a transport latency, as `ros2 bag record` would log it. MCAP chunks are zstd
compressed (rosbag2's `zstd_fast`-style storage compression), which any rosbag2 MCAP reader decodes.

With `compressed="jpeg"` or `"png"` the bag also holds the image_transport topics a RealSense driver publishes beside
the raw ones: `<colour>/compressed` (sensor_msgs/CompressedImage, "rgb8; jpeg compressed bgr8") and
`<depth>/compressedDepth` ("16UC1; compressedDepth png": compressed_depth_image_transport's 12-byte header, then a
16-bit PNG of millimetres); `camera_reliability="best_effort"` records the camera topics as offered with sensor-data
QoS. `compress_bag` adds the same to a bag written earlier (e.g. the cached demo scene's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.rosbag2.enums import CompressionFormat, CompressionMode
from rosbags.typesys import Stores, get_typestore

from m3_memory.core.geometry import xyzw_from_pose
from m3_memory.sim.robot import ARM_BASE, CAMERA, EE, LIDAR, WORLD, Trajectory

TYPESTORE = get_typestore(Stores.ROS2_KILTED)
TOPIC_COLOR = "/camera/color/image_raw"
TOPIC_DEPTH = "/camera/aligned_depth_to_color/image_raw"
TOPIC_INFO = "/camera/color/camera_info"
TOPIC_TF = "/tf"
TOPIC_TF_STATIC = "/tf_static"
TOPIC_ODOM = "/odom"
TOPIC_COLOR_COMPRESSED = TOPIC_COLOR + "/compressed"
TOPIC_DEPTH_COMPRESSED = TOPIC_DEPTH + "/compressedDepth"
CAMERA_TOPICS = (TOPIC_COLOR, TOPIC_DEPTH, TOPIC_INFO, TOPIC_COLOR_COMPRESSED, TOPIC_DEPTH_COMPRESSED)
TOPIC_TYPES = {
    TOPIC_COLOR: "sensor_msgs/msg/Image",
    TOPIC_DEPTH: "sensor_msgs/msg/Image",
    TOPIC_INFO: "sensor_msgs/msg/CameraInfo",
    TOPIC_TF: "tf2_msgs/msg/TFMessage",
    TOPIC_TF_STATIC: "tf2_msgs/msg/TFMessage",
    TOPIC_ODOM: "nav_msgs/msg/Odometry",
}
# Receive latencies (ns) after the header stamp: camera frames travel over USB, TF/odometry are local.
_LATENCY_NS = {
    TOPIC_COLOR: 12_000_000,
    TOPIC_DEPTH: 13_000_000,
    TOPIC_INFO: 12_000_000,
    TOPIC_TF: 500_000,
    TOPIC_ODOM: 2_000_000,
    TOPIC_TF_STATIC: 0,
    TOPIC_COLOR_COMPRESSED: 14_000_000,  # after the raw image: the driver encodes it first
    TOPIC_DEPTH_COMPRESSED: 15_000_000,
}
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"

_T = TYPESTORE.types
_INFINITE = QosTime(sec=9223372036, nsec=854775807)


def _qos(durability: QosDurability, reliability: QosReliability) -> Qos:
    return Qos(
        QosHistory.KEEP_LAST,
        1,
        reliability,
        durability,
        _INFINITE,
        _INFINITE,
        QosLiveliness.AUTOMATIC,
        _INFINITE,
        False,
    )


def _offered_qos(topic: str, camera_reliability: str) -> Qos:
    """What the publisher of `topic` offered: /tf_static latched (transient local) so late subscribers of a replay
    still get the static links; camera topics reliable, or best effort (sensor-data QoS) if `camera_reliability` says."""
    if topic == TOPIC_TF_STATIC:
        return _qos(QosDurability.TRANSIENT_LOCAL, QosReliability.RELIABLE)
    if topic in CAMERA_TOPICS and camera_reliability == "best_effort":
        return _qos(QosDurability.VOLATILE, QosReliability.BEST_EFFORT)
    return _qos(QosDurability.VOLATILE, QosReliability.RELIABLE)


def _header(stamp_ns: int, frame_id: str):
    return _T["std_msgs/msg/Header"](
        stamp=_T["builtin_interfaces/msg/Time"](sec=int(stamp_ns // 10**9), nanosec=int(stamp_ns % 10**9)),
        frame_id=frame_id,
    )


def _transform_stamped(stamp_ns: int, parent: str, child: str, pose: np.ndarray):
    quat, trans = xyzw_from_pose(pose)
    return _T["geometry_msgs/msg/TransformStamped"](
        header=_header(stamp_ns, parent),
        child_frame_id=child,
        transform=_T["geometry_msgs/msg/Transform"](
            translation=_T["geometry_msgs/msg/Vector3"](x=trans[0], y=trans[1], z=trans[2]),
            rotation=_T["geometry_msgs/msg/Quaternion"](x=quat[0], y=quat[1], z=quat[2], w=quat[3]),
        ),
    )


def image_msg(stamp_ns: int, image: np.ndarray, encoding: str):
    """`sensor_msgs/Image` of `image`: `[H, W, 3]` uint8 ('rgb8') or `[H, W]` uint16 millimetres ('16UC1')."""
    height, width = image.shape[:2]
    data = np.ascontiguousarray(image).view(np.uint8).reshape(-1)
    return _T["sensor_msgs/msg/Image"](
        header=_header(stamp_ns, CAMERA),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=len(data) // height,
        data=data,
    )


def compressed_image_msg(stamp_ns: int, rgb: np.ndarray, fmt: str):
    """`sensor_msgs/CompressedImage` of `rgb: [H, W, 3]` uint8 as compressed_image_transport sends it: `fmt` "jpeg"
    (quality 95, its default) or "png", encoded from bgr8."""
    import cv2

    if fmt not in ("jpeg", "png"):
        raise ValueError(f"compressed colour format {fmt!r} unknown; use jpeg or png")
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if fmt == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, data = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", np.ascontiguousarray(rgb[..., ::-1]), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {rgb.shape} image as {fmt}")
    return _T["sensor_msgs/msg/CompressedImage"](header=_header(stamp_ns, CAMERA), format=f"rgb8; {fmt} compressed bgr8",
                                                data=data.reshape(-1))


def compressed_depth_msg(stamp_ns: int, depth_mm: np.ndarray):
    """`sensor_msgs/CompressedImage` of `depth_mm: [H, W]` uint16 as compressed_depth_image_transport sends a 16UC1
    image: format "16UC1; compressedDepth png", data = 12-byte header (int32 format 0, two float32 quantisation
    parameters, unused for 16-bit depth) + the PNG."""
    import cv2

    ok, png = cv2.imencode(".png", np.ascontiguousarray(depth_mm, dtype=np.uint16), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {depth_mm.shape} depth image as PNG")
    header = np.zeros(1, dtype=[("format", "<i4"), ("quant", "<f4", (2,))]).view(np.uint8)
    return _T["sensor_msgs/msg/CompressedImage"](header=_header(stamp_ns, CAMERA), format="16UC1; compressedDepth png",
                                                data=np.concatenate([header, png.reshape(-1)]))


def camera_info_msg(stamp_ns: int, K: np.ndarray, width: int, height: int):
    """`sensor_msgs/CameraInfo` of an undistorted pinhole camera `K: [3, 3]`."""
    projection = np.zeros((3, 4))
    projection[:, :3] = K
    return _T["sensor_msgs/msg/CameraInfo"](
        header=_header(stamp_ns, CAMERA),
        height=height,
        width=width,
        distortion_model="plumb_bob",
        d=np.zeros(5),
        k=K.astype(np.float64).ravel(),
        r=np.eye(3).ravel(),
        p=projection.ravel(),
        binning_x=0,
        binning_y=0,
        roi=_T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False),
    )


def _odometry_msgs(trajectory: Trajectory) -> list:
    """`nav_msgs/Odometry` world -> lidar per odometry sample, twist (in the lidar frame) by central differences."""
    stamps = trajectory.odom_stamps_ns
    poses = trajectory.world_T_lidar
    times = (stamps - stamps[0]) * 1e-9
    velocity_world = np.gradient(poses[:, :3, 3], times, axis=0)
    yaw = np.unwrap(np.arctan2(poses[:, 1, 0], poses[:, 0, 0]))
    yaw_rate = np.gradient(yaw, times)
    vec3, msgs = _T["geometry_msgs/msg/Vector3"], []
    for stamp, pose, vel, rate in zip(stamps, poses, velocity_world, yaw_rate, strict=True):
        quat, trans = xyzw_from_pose(pose)
        linear = pose[:3, :3].T @ vel
        msgs.append(
            _T["nav_msgs/msg/Odometry"](
                header=_header(int(stamp), WORLD),
                child_frame_id=LIDAR,
                pose=_T["geometry_msgs/msg/PoseWithCovariance"](
                    pose=_T["geometry_msgs/msg/Pose"](
                        position=_T["geometry_msgs/msg/Point"](x=trans[0], y=trans[1], z=trans[2]),
                        orientation=_T["geometry_msgs/msg/Quaternion"](x=quat[0], y=quat[1], z=quat[2], w=quat[3]),
                    ),
                    covariance=np.diag([1e-4, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5]).ravel(),
                ),
                twist=_T["geometry_msgs/msg/TwistWithCovariance"](
                    twist=_T["geometry_msgs/msg/Twist"](
                        linear=vec3(x=linear[0], y=linear[1], z=linear[2]), angular=vec3(x=0.0, y=0.0, z=rate)
                    ),
                    covariance=np.diag([1e-3] * 6).ravel(),
                ),
            )
        )
    return msgs


@dataclass
class CameraFrame:
    """One camera frame for the bag: `rgb: [H, W, 3]` uint8, `depth_mm: [H, W]` uint16 aligned to colour."""

    stamp_ns: int
    rgb: np.ndarray
    depth_mm: np.ndarray


def write_bag(path: Path, trajectory: Trajectory, frames: list[CameraFrame], K: np.ndarray,
              compressed: str | None = None, camera_reliability: str = "reliable") -> None:
    """Write the rosbag2 directory `path` (must not exist): camera, TF, static TF and odometry topics; `compressed`
    ("jpeg", "png") adds the compressed colour and compressedDepth topics (module docstring)."""
    height, width = frames[0].rgb.shape[:2]
    messages: list[tuple[int, str, object]] = []  # (stamp_ns, topic, message)
    for frame in frames:
        messages.append((frame.stamp_ns, TOPIC_COLOR, image_msg(frame.stamp_ns, frame.rgb, "rgb8")))
        messages.append((frame.stamp_ns, TOPIC_DEPTH, image_msg(frame.stamp_ns, frame.depth_mm, "16UC1")))
        messages.append((frame.stamp_ns, TOPIC_INFO, camera_info_msg(frame.stamp_ns, K, width, height)))
        if compressed is not None:
            messages += _compressed_messages(frame.stamp_ns, frame.rgb, frame.depth_mm, compressed)
    tf_message = _T["tf2_msgs/msg/TFMessage"]
    for stamp, pose in zip(trajectory.odom_stamps_ns, trajectory.world_T_lidar, strict=True):
        messages.append(
            (int(stamp), TOPIC_TF, tf_message(transforms=[_transform_stamped(int(stamp), WORLD, LIDAR, pose)]))
        )
    for stamp, pose in zip(trajectory.arm_stamps_ns, trajectory.arm_base_T_ee, strict=True):
        messages.append(
            (int(stamp), TOPIC_TF, tf_message(transforms=[_transform_stamped(int(stamp), ARM_BASE, EE, pose)]))
        )
    for msg in _odometry_msgs(trajectory):
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        messages.append((stamp, TOPIC_ODOM, msg))
    first = min(stamp for stamp, _, _ in messages)
    statics = [_transform_stamped(first, parent, child, pose) for parent, child, pose in trajectory.static_transforms()]
    messages.append((first, TOPIC_TF_STATIC, tf_message(transforms=statics)))
    messages.sort(key=lambda item: item[0] + _LATENCY_NS[item[1]])
    _write(path, [(stamp + _LATENCY_NS[topic], topic, msg) for stamp, topic, msg in messages], camera_reliability)


def _compressed_messages(stamp_ns: int, rgb: np.ndarray, depth_mm: np.ndarray, fmt: str) -> list:
    return [(stamp_ns, TOPIC_COLOR_COMPRESSED, compressed_image_msg(stamp_ns, rgb, fmt)),
            (stamp_ns, TOPIC_DEPTH_COMPRESSED, compressed_depth_msg(stamp_ns, depth_mm))]


def _msgtype(topic: str) -> str:
    return COMPRESSED_TYPE if topic in (TOPIC_COLOR_COMPRESSED, TOPIC_DEPTH_COMPRESSED) else TOPIC_TYPES[topic]


def _write(path: Path, messages: list[tuple[int, str, object]], camera_reliability: str) -> None:
    """Write `(bag time ns, topic, message)` items, in that order, as the MCAP bag `path`."""
    if camera_reliability not in ("reliable", "best_effort"):
        raise ValueError(f"camera_reliability {camera_reliability!r} unknown; use reliable or best_effort")
    writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    with writer:
        connections = {}
        for topic in dict.fromkeys(topic for _, topic, _ in messages):
            connections[topic] = writer.add_connection(topic, _msgtype(topic), typestore=TYPESTORE,
                                                       offered_qos_profiles=[_offered_qos(topic, camera_reliability)])
        for bag_ns, topic, msg in messages:
            writer.write(connections[topic], bag_ns, TYPESTORE.serialize_cdr(msg, _msgtype(topic)))


def compress_bag(src: Path, dst: Path, compressed: str = "jpeg", camera_reliability: str = "reliable") -> None:
    """Copy the demo bag `src` to the new bag `dst` with the compressed colour and compressedDepth topics added
    (encoded from its raw images, `compressed` "jpeg" or "png") and the camera topics offered as `camera_reliability`."""
    from rosbags.rosbag2 import Reader

    messages = []
    with Reader(src) as reader:
        for connection, bag_ns, raw in reader.messages():
            msg = TYPESTORE.deserialize_cdr(raw, connection.msgtype)
            messages.append((bag_ns, connection.topic, msg))
            if connection.topic == TOPIC_COLOR:
                rgb = np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.width, 3)
                stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
                messages.append((bag_ns + 2_000_000, TOPIC_COLOR_COMPRESSED, compressed_image_msg(stamp, rgb, compressed)))
            elif connection.topic == TOPIC_DEPTH:
                depth = np.frombuffer(msg.data, np.uint16).reshape(msg.height, msg.width)
                stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
                messages.append((bag_ns + 2_000_000, TOPIC_DEPTH_COMPRESSED, compressed_depth_msg(stamp, depth)))
    messages.sort(key=lambda item: item[0])
    _write(dst, messages, camera_reliability)
