"""Recorder node: turns the camera stream and the robot's TF tree into a posed scene directory.

Subscribes to colour, aligned depth, CameraInfo, `/tf` and `/tf_static`. Each colour frame (paired with the depth frame
of the same stamp) waits until the transforms around its stamp have arrived, gets its camera pose by composing the
chain world ← lidar ← base ← arm base ← end effector ← camera at the image stamp (eq. 3 of the M3 paper), goes through
keyframe selection (motion, blur) and is appended crash-safely to the scene (m3_memory.core.scene.SceneWriter).
Frames that cannot be used are counted by reason: dropped (gap in the stream), out_of_order, unsynchronised (no depth
partner), no_camera_info, stale / gap / no_path (transforms), bad_image, blurred, no_motion.

Services `m3/recorder/start` and `m3/recorder/stop` (std_srvs/Trigger); status on `m3/recorder/status` (latched).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from m3_msgs.msg import RecorderStatus
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage

from m3_memory.core.recording import KeyframeConfig, KeyframeSelector
from m3_memory.core.scene import SceneMeta, SceneWriter
from m3_memory.core.transforms import TransformBuffer, TransformError
from m3_memory.ros.conversions import (ImageEncodingError, add_transforms, camera_info_K, image_to_depth, image_to_rgb,
                                       stamp_ns)
from m3_memory.ros.qos import LATCHED, TF_QOS, TF_STATIC_QOS
from m3_memory.ros.spin import spin_node

IMAGE_QOS = QoSProfile(depth=30, reliability=ReliabilityPolicy.RELIABLE)


@dataclass
class PendingFrame:
    stamp_ns: int
    frame_id: str
    received: float  # monotonic seconds, for the wall-clock give-up
    rgb: Image | None = None
    depth: Image | None = None


@dataclass
class Scan:
    root: Path
    writer: SceneWriter | None = None
    keyframes: KeyframeSelector | None = None
    seen: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    last_color_ns: int | None = None


class Recorder(Node):
    def __init__(self):
        super().__init__("recorder")
        p = self.declare_parameter
        # absolute: the path goes to other nodes (the trainer) in status and service answers
        self.output_root = Path(p("output_root", "scans").value).expanduser().resolve()
        self.world_frame = p("world_frame", "world").value
        self.require_depth = p("require_depth", True).value
        self.expected_fps = p("expected_fps", 30.0).value
        self.wait_s = p("wait_seconds", 1.0).value
        self.buffer = TransformBuffer(tolerance_ns=int(p("tf_tolerance_seconds", 0.0).value * 1e9),
                                      max_gap_ns=int(p("tf_max_gap_seconds", 0.5).value * 1e9))
        self.keyframe_config = KeyframeConfig(
            min_translation_m=p("min_translation_m", 0.08).value, min_rotation_deg=p("min_rotation_deg", 7.0).value,
            blur_ratio=p("blur_ratio", 0.5).value)
        color_topic = p("color_topic", "/camera/color/image_raw").value
        depth_topic = p("depth_topic", "/camera/aligned_depth_to_color/image_raw").value
        info_topic = p("camera_info_topic", "/camera/color/camera_info").value

        self.camera_info: CameraInfo | None = None
        self.pending: dict[int, PendingFrame] = {}
        self.scan: Scan | None = None
        self.last_scan: Scan | None = None
        self.status_pub = self.create_publisher(RecorderStatus, "m3/recorder/status", LATCHED)
        self.create_subscription(Image, color_topic, self.on_color, IMAGE_QOS)
        self.create_subscription(Image, depth_topic, self.on_depth, IMAGE_QOS)
        self.create_subscription(CameraInfo, info_topic, self.on_camera_info, qos_profile_sensor_data)
        self.create_subscription(TFMessage, "/tf", lambda m: self.on_tf(m, static=False), TF_QOS)
        self.create_subscription(TFMessage, "/tf_static", lambda m: self.on_tf(m, static=True), TF_STATIC_QOS)
        self.create_service(Trigger, "m3/recorder/start", self.on_start)
        self.create_service(Trigger, "m3/recorder/stop", self.on_stop)
        self.create_timer(0.05, self.process_pending)
        self.create_timer(1.0, self.publish_status)
        self.publish_status()
        self.get_logger().info(f"ready: call m3/recorder/start to scan ({color_topic}, {depth_topic}, TF to "
                               f"{self.world_frame}); scenes go below {self.output_root}")

    # --- inputs -------------------------------------------------------------------------------------------------
    def on_tf(self, msg: TFMessage, static: bool) -> None:
        add_transforms(self.buffer, msg, static, self.get_logger())

    def on_camera_info(self, msg: CameraInfo) -> None:
        self.camera_info = msg

    def on_color(self, msg: Image) -> None:
        scan = self.scan
        if scan is None:
            return
        scan.seen += 1
        stamp = stamp_ns(msg.header.stamp)
        if scan.last_color_ns is not None:
            if stamp <= scan.last_color_ns:
                self.reject(scan, "out_of_order", f"frame at {stamp} ns arrived after {scan.last_color_ns} ns")
                return
            missing = round((stamp - scan.last_color_ns) * 1e-9 * self.expected_fps) - 1
            if missing > 0:
                scan.rejected["dropped"] += missing
        scan.last_color_ns = stamp
        self._pending(stamp, msg.header.frame_id).rgb = msg

    def on_depth(self, msg: Image) -> None:
        if self.scan is not None and self.require_depth:
            self._pending(stamp_ns(msg.header.stamp), msg.header.frame_id).depth = msg

    def _pending(self, stamp: int, frame_id: str) -> PendingFrame:
        if stamp not in self.pending:
            self.pending[stamp] = PendingFrame(stamp, frame_id, time.monotonic())
        return self.pending[stamp]

    # --- decisions ----------------------------------------------------------------------------------------------
    def reject(self, scan: Scan, reason: str, detail: str) -> None:
        scan.rejected[reason] += 1
        self.get_logger().info(f"frame rejected ({reason}): {detail}", throttle_duration_sec=2.0)

    def process_pending(self, flush: bool = False) -> None:
        scan = self.scan
        if scan is None:
            return
        now = time.monotonic()
        for stamp in sorted(self.pending):
            frame = self.pending[stamp]
            waited_out = flush or now - frame.received > self.wait_s
            if frame.rgb is None or (self.require_depth and frame.depth is None):
                if waited_out:
                    del self.pending[stamp]
                    if frame.rgb is not None:
                        self.reject(scan, "unsynchronised", f"no depth image with stamp {stamp} ns")
                continue
            ready = self.camera_info is not None and self.buffer.covers(self.world_frame, frame.frame_id, stamp)
            if not (ready or waited_out):
                break  # later frames wait for this one: frames are written in stamp order
            del self.pending[stamp]
            self.record(scan, frame)

    def record(self, scan: Scan, frame: PendingFrame) -> None:
        if self.camera_info is None:
            self.reject(scan, "no_camera_info", "no CameraInfo received yet")
            return
        try:
            c2w = self.buffer.lookup(self.world_frame, frame.frame_id, frame.stamp_ns)
        except TransformError as exc:
            self.reject(scan, exc.reason, str(exc))
            return
        try:
            rgb = image_to_rgb(frame.rgb)
            depth = image_to_depth(frame.depth) if frame.depth is not None else None
        except ImageEncodingError as exc:
            self.reject(scan, "bad_image", str(exc))
            return
        if depth is not None and depth.shape != rgb.shape[:2]:
            self.reject(scan, "bad_image", f"depth {depth.shape} is not aligned to colour {rgb.shape[:2]}")
            return
        keep, reason = scan.keyframes.consider(c2w, rgb)
        if not keep:
            scan.rejected[reason] += 1
            return
        if scan.writer is None:
            meta = SceneMeta(width=rgb.shape[1], height=rgb.shape[0], K=camera_info_K(self.camera_info),
                             world_frame=self.world_frame)
            scan.writer = SceneWriter(scan.root, meta)
        scan.writer.add_frame(f"{scan.kept:06d}", rgb, c2w, frame.stamp_ns, depth=depth,
                              K=camera_info_K(self.camera_info))
        scan.kept += 1

    # --- services and status ------------------------------------------------------------------------------------
    def on_start(self, _request, response: Trigger.Response) -> Trigger.Response:
        if self.scan is not None:
            response.success, response.message = False, f"already recording into {self.scan.root}: stop first"
            return response
        name = datetime.now(timezone.utc).strftime("scan_%Y%m%d_%H%M%S_%f")
        self.pending.clear()
        self.scan = Scan(root=self.output_root / name, keyframes=KeyframeSelector(self.keyframe_config))
        self.get_logger().info(f"recording into {self.scan.root}")
        response.success, response.message = True, str(self.scan.root)
        self.publish_status()
        return response

    def on_stop(self, _request, response: Trigger.Response) -> Trigger.Response:
        scan = self.scan
        if scan is None:
            response.success, response.message = False, "not recording: call m3/recorder/start first"
            return response
        self.process_pending(flush=True)
        self.scan, self.last_scan = None, scan
        if scan.writer is not None:
            scan.writer.close()
        summary = (f"kept {scan.kept} of {scan.seen} frames into {scan.root}; rejected: "
                   + (", ".join(f"{k} {v}" for k, v in sorted(scan.rejected.items())) or "none"))
        self.get_logger().info(summary)
        response.success, response.message = scan.kept > 0, summary if scan.kept else f"no frame kept: {summary}"
        self.publish_status()
        return response

    def publish_status(self) -> None:
        scan = self.scan or self.last_scan
        status = RecorderStatus(stamp=self.get_clock().now().to_msg(), recording=self.scan is not None)
        if scan is not None:
            reasons = sorted(scan.rejected)
            status.scene_dir, status.frames_seen, status.frames_kept = str(scan.root), scan.seen, scan.kept
            status.frames_rejected = sum(scan.rejected.values())
            status.reject_reasons, status.reject_counts = reasons, [scan.rejected[r] for r in reasons]
        self.status_pub.publish(status)


def main(args: list[str] | None = None) -> int:
    return spin_node(Recorder, args)
