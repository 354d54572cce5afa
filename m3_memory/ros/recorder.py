"""Recorder node: turns the camera stream and the robot's TF tree into a posed scene directory.

Subscribes to colour, aligned depth, CameraInfo, `/tf` and `/tf_static`. Camera topics are relative (they follow the
node's namespace, so `namespace:=robot1` moves the whole robot); `/tf` and `/tf_static` stay absolute, as in ROS. Images
come raw (sensor_msgs/Image) or through an image_transport transport (`color_transport: compressed` for JPEG/PNG,
`depth_transport: compressedDepth` for RealSense's PNG depth, or a topic name ending in `/compressed` or
`/compressedDepth`), decoded with OpenCV. `image_reliability: auto` subscribes as the publishers offer (as rosbag2 does):
reliable for reliable publishers, so none of their frames is lost, best effort when a publisher is best effort
(sensor-data QoS), re-checked every second. Each colour frame (paired with the depth frame of the same stamp) waits up to `wait_seconds` for the transforms around its stamp and is posed as soon as they arrive,
by composing the chain world ← lidar ← base ← arm base ← end effector ← camera at the image stamp (eq. 3 of the M3
paper); it then goes through keyframe selection (motion, blur) and is appended crash-safely to the scene
(m3_memory.core.scene.SceneWriter).

Threads: the streams (TF, images, CameraInfo) are taken in on a thread of their own (m3_memory.ros.intake), so a 50 Hz
/tf keeps up while frames are decided, services answered and keyframes written; chosen keyframes go through a bounded
queue to a writer thread (PNG encoding, fsync), so no callback waits on the disk.

Every colour frame that arrives while recording ends in exactly one count (seen = kept + rejections): kept, or rejected
as out_of_order, unsynchronised (no depth partner), no_camera_info, bad_camera_info, bad_image, stale / gap / no_path
(transforms), blurred, no_motion, write_overflow (writer queue full), write_failed or error. Frames missing from the
stream (stamp gaps against the measured frame period) never arrived: they are reported as dropped, apart from these.
A jump back in time (a bag replayed again) clears the transform history, as tf2 does. A failing write stops the scan
cleanly (scene closed, status published, the reason logged and answered by the next stop). Temporary files that a killed
recorder left in earlier scans are removed at start.

Services `m3/recorder/start` and `m3/recorder/stop` (std_srvs/Trigger); status on `m3/recorder/status` (latched): the
counts add up there too (frames_seen = frames_kept + frames_rejected + frames_pending, frames_rejected = the sum of
reject_counts), with frames_dropped, transforms_ignored and a message saying why a scan stopped itself or the last
problem.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from m3_msgs.msg import RecorderStatus
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage

from m3_memory.core.atomic import remove_stale_temps
from m3_memory.core.recording import FrameError, KeyframeConfig, KeyframeSelector, check_intrinsics, missing_frames
from m3_memory.core.scene import SceneMeta, SceneWriter
from m3_memory.core.transforms import TransformBuffer, TransformError
from m3_memory.ros.conversions import (ImageEncodingError, add_transforms, camera_info_K, color_to_rgb, depth_to_metres,
                                       stamp_ns)
from m3_memory.ros.intake import IntakeThread, offered_reliability
from m3_memory.ros.qos import LATCHED, TF_INTAKE_QOS, TF_STATIC_QOS
from m3_memory.ros.spin import spin_node
from m3_memory.ros.transfer import serve_scans

IMAGE_DEPTH = 30  # frames a subscription holds: 1-2 s of a camera stream behind a busy process
RELIABILITY = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}
# image_transport transports per stream: the subscribed topic is `<topic>/<transport>` (raw: `<topic>` itself)
TRANSPORTS = {"color": ("raw", "compressed"), "depth": ("raw", "compressed", "compressedDepth")}
KEYFRAME_CHOICES = ("no_motion", "blurred")  # rejections that are keyframe selection, not faults: not logged
# Each kind of problem is logged the first few times in full, then at most every few seconds (a broken stream at 30 Hz
# must not flood the log, but the first bad frames must each say what is wrong).
LOG_FIRST, LOG_EVERY_S = 3, 2.0


@dataclass
class PendingFrame:
    stamp_ns: int
    frame_id: str
    received: float  # monotonic seconds, for the wall-clock give-up
    rgb: Image | CompressedImage | None = None
    depth: Image | CompressedImage | None = None


@dataclass
class Keyframe:
    """A posed frame chosen for the scene, on its way to disk: `rgb: [H, W, 3]` uint8, `depth: [H, W]` float metres,
    `c2w: [4, 4]` camera-to-world, `K: [3, 3]`."""

    stamp_ns: int
    rgb: np.ndarray
    depth: np.ndarray | None
    c2w: np.ndarray
    K: np.ndarray


@dataclass
class ImageStream:
    """One camera stream: `topic` as configured plus its transport suffix, `resolved` in the node's namespace,
    `msg_type` Image (raw) or CompressedImage, and the subscription with the reliability it was made with."""

    topic: str
    resolved: str
    msg_type: type
    callback: Callable
    subscription: object = None
    reliability: ReliabilityPolicy | None = None


@dataclass
class Scan:
    root: Path
    keyframes: KeyframeSelector
    queue: queue.Queue  # Keyframe items for the writer thread; None ends it
    writer: threading.Thread | None = None
    size: tuple[int, int] | None = None  # (width, height) of the first keyframe: every later frame must match
    seen: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    steps_ns: list[int] = field(default_factory=list)  # between consecutive colour stamps: the measured frame rate
    last_color_ns: int | None = None
    transforms_ignored: int = 0
    fault: str | None = None  # why the scan stopped itself
    problem: str = ""  # the last rejection (other than keyframe choices) or ignored transform, for the status

    def fps(self) -> float:
        return 1e9 / float(np.median(self.steps_ns)) if len(self.steps_ns) >= 3 else 0.0

    def summary(self) -> str:
        text = (f"kept {self.kept} of {self.seen} frames into {self.root}; rejected: "
                + (", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"))
        dropped = missing_frames(self.steps_ns)
        if dropped:
            text += f"; dropped {dropped} (missing from the {self.fps():.1f} Hz stream, never received)"
        if self.transforms_ignored:
            text += f"; ignored {self.transforms_ignored} malformed transforms"
        return text


class Recorder(Node):
    def __init__(self):
        super().__init__("recorder")
        p = self.declare_parameter
        # absolute: the path goes to other nodes (the trainer) in status and service answers
        self.output_root = Path(p("output_root", "scans").value).expanduser().resolve()
        self.world_frame = p("world_frame", "world").value
        self.require_depth = p("require_depth", True).value
        self.wait_s = p("wait_seconds", 1.0).value
        self.jump_back_ns = int(p("jump_back_seconds", 1.0).value * 1e9)
        self.queue_frames = p("write_queue_frames", 32).value
        self.buffer = TransformBuffer(tolerance_ns=int(p("tf_tolerance_seconds", 0.0).value * 1e9),
                                      max_gap_ns=int(p("tf_max_gap_seconds", 0.5).value * 1e9),
                                      jump_back_ns=self.jump_back_ns)
        self.keyframe_config = KeyframeConfig(
            min_translation_m=p("min_translation_m", 0.08).value, min_rotation_deg=p("min_rotation_deg", 7.0).value,
            blur_ratio=p("blur_ratio", 0.5).value)
        self.streams = [
            self._stream("color", p("color_topic", "camera/color/image_raw").value, p("color_transport", "raw").value,
                         self.on_color),
            self._stream("depth", p("depth_topic", "camera/aligned_depth_to_color/image_raw").value,
                         p("depth_transport", "raw").value, self.on_depth)]
        info_topic = p("camera_info_topic", "camera/color/camera_info").value
        reliability = p("image_reliability", "auto").value
        if reliability != "auto" and reliability not in RELIABILITY:
            raise ValueError(f"image_reliability {reliability!r} unknown; use auto, {', '.join(RELIABILITY)}")
        self.image_reliability = RELIABILITY.get(reliability)  # None: as the publishers offer

        # Intake (images, TF) runs beside the frame decisions; the lock guards what they share (buffer, pending, counts).
        self.lock = threading.Lock()
        self.camera_info: CameraInfo | None = None
        self.pending: dict[int, PendingFrame] = {}
        self.scan: Scan | None = None
        self.last_scan: Scan | None = None
        self._logged: dict[str, tuple[int, float]] = {}  # problem kind → (times logged, monotonic time of the last)
        self._clean_interrupted_writes()
        frames = MutuallyExclusiveCallbackGroup()
        self.status_pub = self.create_publisher(RecorderStatus, "m3/recorder/status", LATCHED)
        self.intake = IntakeThread(self)
        self.intake.subscribe(CameraInfo, info_topic, self.on_camera_info, qos_profile_sensor_data)
        self.intake.subscribe(TFMessage, "/tf", lambda m: self.on_tf(m, static=False), TF_INTAKE_QOS)
        self.intake.subscribe(TFMessage, "/tf_static", lambda m: self.on_tf(m, static=True), TF_STATIC_QOS)
        self.subscribe_images()
        if self.image_reliability is None:
            self.intake.node.create_timer(1.0, self.subscribe_images)
        self.create_service(Trigger, "m3/recorder/start", self.on_start, callback_group=frames)
        self.create_service(Trigger, "m3/recorder/stop", self.on_stop, callback_group=frames)
        self.transfer = serve_scans(self, self.output_root, lambda: [s.root for s in (self.scan, self.last_scan) if s
                                                                     and s.writer and s.writer.is_alive()])
        self.create_timer(0.02, self.tick, callback_group=frames)
        self.create_timer(1.0, self.publish_status, callback_group=frames)
        self.publish_status()
        self.get_logger().info(f"ready: call m3/recorder/start to scan ({', '.join(s.resolved for s in self.streams)}, "
                               f"TF to {self.world_frame}); scenes go below {self.output_root}")

    def _stream(self, name: str, topic: str, transport: str, callback) -> ImageStream:
        """The stream of `topic` through image_transport `transport`; a topic that ends in a transport's name (e.g.
        `.../compressed`) is that transport's topic already."""
        known = TRANSPORTS[name]
        named = topic.rsplit("/", 1)[-1]
        if named in known[1:]:
            transport, subscribed = named, topic
        elif transport in known:
            subscribed = topic if transport == "raw" else f"{topic}/{transport}"
        else:
            raise ValueError(f"{name}_transport {transport!r} unknown; use one of {', '.join(known)}")
        return ImageStream(subscribed, self.resolve_topic_name(subscribed),
                           Image if transport == "raw" else CompressedImage, callback)

    def subscribe_images(self) -> None:
        """Subscribe each image stream with the configured reliability, or (auto) the one its publishers offer
        (reliable until a publisher shows up); a stream whose publishers changed their offer is subscribed anew."""
        for stream in self.streams:
            wanted = self.image_reliability or offered_reliability(self.intake.node, stream.resolved) \
                or ReliabilityPolicy.RELIABLE
            if stream.subscription is not None and wanted == stream.reliability:
                continue
            old, stream.reliability = stream.subscription, wanted
            stream.subscription = self.intake.subscribe(stream.msg_type, stream.topic, stream.callback,
                                                        QoSProfile(depth=IMAGE_DEPTH, reliability=wanted))
            if old is not None:
                self.intake.unsubscribe(old)
                self.get_logger().info(f"{stream.resolved}: its publishers offer {wanted.name.lower()}; "
                                       f"subscribed {wanted.name.lower()}")

    def _clean_interrupted_writes(self) -> None:
        if not self.output_root.is_dir():
            return
        removed = [path for scan in self.output_root.iterdir() if scan.is_dir()
                   for path in remove_stale_temps(scan, recursive=True)]
        if removed:
            self.get_logger().info(f"removed {len(removed)} temporary files of interrupted writes, e.g. {removed[0]}")

    def destroy_node(self) -> None:
        self.intake.stop()
        super().destroy_node()

    # --- inputs (on the intake thread) --------------------------------------------------------------------------
    def warn(self, kind: str, text: str) -> None:
        times, last = self._logged.get(kind, (0, 0.0))
        now = time.monotonic()
        if times < LOG_FIRST or now - last >= LOG_EVERY_S:
            self._logged[kind] = (times + 1, now)
            self.get_logger().warning(text)

    def on_tf(self, msg: TFMessage, static: bool) -> None:
        with self.lock:
            intake = add_transforms(self.buffer, msg, static, None)
            if self.scan is not None and intake.rejected:
                self.scan.transforms_ignored += len(intake.rejected)
                self.scan.problem = f"ignored {intake.rejected[-1]}"
        for problem in intake.rejected:
            self.warn("transform", f"ignoring {problem}")
        if intake.jumped_back_ns:
            self.get_logger().warning(f"time jumped back {intake.jumped_back_ns * 1e-9:.3f} s on /tf: cleared the "
                                      f"transform history, as tf2 does")

    def on_camera_info(self, msg: CameraInfo) -> None:
        self.camera_info = msg  # checked against each frame's image when the frame is decided

    def on_color(self, msg: Image | CompressedImage) -> None:
        with self.lock:
            self._take_color(msg)

    def _take_color(self, msg: Image | CompressedImage) -> None:
        scan = self.scan
        if scan is None:
            return
        scan.seen += 1
        stamp = stamp_ns(msg.header.stamp)
        if scan.last_color_ns is not None:
            step = stamp - scan.last_color_ns
            if step < -self.jump_back_ns:
                self.get_logger().warning(f"camera time jumped back {-step * 1e-9:.3f} s: a new stream (bag replay?)")
            elif step <= 0:
                scan.rejected["out_of_order"] += 1
                scan.problem = f"frame at {stamp} ns arrived after {scan.last_color_ns} ns (out_of_order)"
                self.warn("out_of_order", f"frame rejected (out_of_order): frame at {stamp} ns arrived after "
                                          f"{scan.last_color_ns} ns")
                return
            else:
                scan.steps_ns.append(step)
        scan.last_color_ns = stamp
        self._pending(stamp, msg.header.frame_id).rgb = msg

    def on_depth(self, msg: Image | CompressedImage) -> None:
        with self.lock:
            if self.scan is not None and self.require_depth:
                self._pending(stamp_ns(msg.header.stamp), msg.header.frame_id).depth = msg

    def _pending(self, stamp: int, frame_id: str) -> PendingFrame:
        if stamp not in self.pending:
            self.pending[stamp] = PendingFrame(stamp, frame_id, time.monotonic())
        return self.pending[stamp]

    # --- decisions ----------------------------------------------------------------------------------------------
    def reject(self, scan: Scan, reason: str, detail: str) -> None:
        with self.lock:
            scan.rejected[reason] += 1
            if reason not in KEYFRAME_CHOICES:
                scan.problem = f"frame rejected ({reason}): {detail}"
        if reason not in KEYFRAME_CHOICES:
            self.warn(reason, f"frame rejected ({reason}): {detail}")

    def tick(self) -> None:
        if self.scan is not None and self.scan.fault is not None:
            self.finish(self.scan)  # the writer failed: stop the scan now, not at the next stop call
        if self.scan is not None:
            self.process_pending(self.scan)

    def process_pending(self, scan: Scan, flush: bool = False) -> None:
        now, unpaired, complete = time.monotonic(), [], []
        with self.lock:  # only pick the frames here: intake must not wait for the decoding below
            for stamp in sorted(self.pending):
                frame = self.pending[stamp]
                waited_out = flush or now - frame.received > self.wait_s
                if frame.rgb is None or (self.require_depth and frame.depth is None):
                    if waited_out:
                        del self.pending[stamp]
                        if frame.rgb is not None:
                            unpaired.append(stamp)
                    continue
                ready = self.camera_info is not None and self.buffer.covers(self.world_frame, frame.frame_id, stamp)
                if not (ready or waited_out):
                    break  # later frames wait for this one: frames are written in stamp order
                complete.append(self.pending.pop(stamp))
        for stamp in unpaired:
            self.reject(scan, "unsynchronised", f"no depth image with stamp {stamp} ns")
        for frame in complete:
            waited = now - frame.received
            try:
                self.record(scan, frame, waited)
            except (FrameError, TransformError) as exc:
                self.reject(scan, exc.reason, str(exc))
            except Exception as exc:  # a frame must never take the node down; count it and say why
                self.reject(scan, "error", f"{type(exc).__name__}: {exc}")

    def record(self, scan: Scan, frame: PendingFrame, waited: float) -> None:
        """Pose, check and select one complete frame; queues it for writing or raises why not."""
        try:
            rgb = color_to_rgb(frame.rgb)
            depth = depth_to_metres(frame.depth) if frame.depth is not None else None
        except ImageEncodingError as exc:
            raise FrameError("bad_image", str(exc)) from exc
        height, width = rgb.shape[:2]
        if depth is not None and depth.shape != rgb.shape[:2]:
            raise FrameError("bad_image", f"depth {depth.shape[1]}x{depth.shape[0]} is not aligned to colour "
                                          f"{width}x{height}")
        if scan.size is not None and scan.size != (width, height):
            raise FrameError("bad_image", f"frame is {width}x{height} but this scan records {scan.size[0]}x"
                                          f"{scan.size[1]} images: a new resolution needs a new scan")
        info = self.camera_info
        if info is None:
            raise FrameError("no_camera_info", "no CameraInfo received yet")
        if info.width and info.height and (info.width, info.height) != (width, height):
            raise FrameError("bad_camera_info", f"CameraInfo is for {info.width}x{info.height} images, the frame is "
                                                f"{width}x{height}")
        K = camera_info_K(info)
        check_intrinsics(K, width, height)
        try:
            with self.lock:
                c2w = self.buffer.lookup(self.world_frame, frame.frame_id, frame.stamp_ns)
        except TransformError as exc:
            raise TransformError(exc.reason, f"{exc} (waited {waited:.2f} s for it)") from exc
        keep, reason = scan.keyframes.consider(c2w, rgb)
        if not keep:
            raise FrameError(reason, "keyframe selection")
        try:
            scan.queue.put_nowait(Keyframe(frame.stamp_ns, rgb, depth, c2w, K))
        except queue.Full:
            raise FrameError("write_overflow", f"the writer is {self.queue_frames} keyframes behind "
                                               f"(write_queue_frames): the disk is too slow") from None
        scan.size = (width, height)

    def write_scan(self, scan: Scan) -> None:
        """Writer thread: appends the queued keyframes to the scene until None; the first failure stops the scan."""
        writer = None
        try:
            while (item := scan.queue.get()) is not None:
                if scan.fault is None:
                    try:
                        if writer is None:
                            meta = SceneMeta(width=item.rgb.shape[1], height=item.rgb.shape[0], K=item.K,
                                             world_frame=self.world_frame)
                            writer = SceneWriter(scan.root, meta)
                        writer.add_frame(f"{scan.kept:06d}", item.rgb, item.c2w, item.stamp_ns, depth=item.depth,
                                         K=item.K)
                    except Exception as exc:  # disk full, permissions, ...: stop this scan, keep the node
                        scan.fault = f"writing the frame at {item.stamp_ns} ns failed: {type(exc).__name__}: {exc}"
                        self.get_logger().error(f"scan {scan.root} stops: {scan.fault}")
                with self.lock:
                    if scan.fault is None:
                        scan.kept += 1
                    else:
                        scan.rejected["write_failed"] += 1
        finally:
            if writer is not None:
                writer.close()

    # --- services and status ------------------------------------------------------------------------------------
    def on_start(self, _request, response: Trigger.Response) -> Trigger.Response:
        if self.scan is not None:
            response.success, response.message = False, f"already recording into {self.scan.root}: stop first"
            return response
        name = datetime.now(timezone.utc).strftime("scan_%Y%m%d_%H%M%S_%f")
        with self.lock:
            self.pending.clear()
        scan = Scan(root=self.output_root / name, keyframes=KeyframeSelector(self.keyframe_config),
                    queue=queue.Queue(maxsize=self.queue_frames))
        scan.writer = threading.Thread(target=self.write_scan, args=(scan,), name="scene-writer", daemon=True)
        scan.writer.start()
        self.scan = scan
        self.get_logger().info(f"recording into {scan.root}")
        response.success, response.message = True, str(scan.root)
        self.publish_status()
        return response

    def on_stop(self, _request, response: Trigger.Response) -> Trigger.Response:
        scan = self.scan
        if scan is None:
            last = self.last_scan
            if last is not None and last.fault is not None:
                response.success, response.message = False, f"the scan stopped itself: {last.fault}; {last.summary()}"
            else:
                response.success, response.message = False, "not recording: call m3/recorder/start first"
            return response
        # Frames still pending get the rest of their wait for transforms that are on their way.
        deadline = max((f.received for f in self.pending.values()), default=0.0) + self.wait_s
        while self.pending and time.monotonic() < deadline and scan.fault is None:
            self.process_pending(scan)
            time.sleep(0.01)
        summary = self.finish(scan)
        if scan.fault is not None:
            response.success, response.message = False, f"the scan stopped itself: {scan.fault}; {summary}"
        else:
            response.success, response.message = scan.kept > 0, summary if scan.kept else f"no frame kept: {summary}"
        return response

    def finish(self, scan: Scan) -> str:
        """End `scan`: decide what is pending, let the writer write what is queued, close the scene."""
        with self.lock:  # from here on, frames that arrive belong to no scan
            self.scan, self.last_scan = None, scan
        self.process_pending(scan, flush=True)
        scan.queue.put(None)
        scan.writer.join()
        summary = scan.summary()
        if scan.fault is None:
            self.get_logger().info(summary)
        else:
            self.get_logger().error(f"scan stopped by a fault: {scan.fault}; {summary}")
        self.publish_status()
        return summary

    def publish_status(self) -> None:
        scan = self.scan or self.last_scan
        status = RecorderStatus(stamp=self.get_clock().now().to_msg(), recording=self.scan is not None)
        if scan is not None:
            with self.lock:
                reasons = sorted(scan.rejected)
                status.scene_dir, status.frames_seen, status.frames_kept = str(scan.root), scan.seen, scan.kept
                status.frames_rejected = sum(scan.rejected.values())
                status.reject_reasons, status.reject_counts = reasons, [scan.rejected[r] for r in reasons]
                status.frames_pending = scan.seen - scan.kept - status.frames_rejected
                steps = list(scan.steps_ns)
                status.transforms_ignored = scan.transforms_ignored
                status.message = f"the scan stopped itself: {scan.fault}" if scan.fault else scan.problem
            status.frames_dropped = missing_frames(steps)
            status.measured_fps = scan.fps()
        self.status_pub.publish(status)


def main(args: list[str] | None = None) -> int:
    return spin_node(Recorder, args, threads=4)
