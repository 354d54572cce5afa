"""Recorder hardening (issue #17) over real DDS: bad inputs are counted and survived, every posable frame of a stream at
real rates is kept, time going backwards is handled, interrupted writes leave no litter, shutdown is clean."""
import math
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from geometry_msgs.msg import TransformStamped
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage

from conftest import node_process, wait_for
from m3_memory.core.atomic import remove_stale_temps, write_atomic
from m3_memory.core.scene import Scene
from m3_memory.ros.graph_client import call_service

SECOND = 10**9
COLOR, DEPTH, INFO = "/camera/color/image_raw", "/camera/aligned_depth_to_color/image_raw", "/camera/color/camera_info"
SPEED = 0.3  # m/s of the robot along x


def trigger(name: str) -> Trigger.Response:
    return call_service(Trigger, name, Trigger.Request(), timeout=30)


def start_recorder(root: Path, *params: str):
    args = [f"output_root:={root}", "wait_seconds:=0.5", "blur_ratio:=0.0", "world_frame:=odom", *params]
    return node_process("m3_recorder", "--ros-args", *[a for p in args for a in ("-p", p)])


def stop_process(process) -> str:
    """SIGINT the recorder and return its whole output (which must show a clean shutdown)."""
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
    assert "never retrieved" not in output and "Traceback" not in output, output
    return output


def counts(message: str) -> tuple[int, int, dict[str, int]]:
    """(kept, seen, rejections) of a stop answer 'kept K of S frames into ...; rejected: a 1, b 2; ...'."""
    kept, seen = map(int, re.search(r"kept (\d+) of (\d+) frames", message).groups())
    listed = re.search(r"rejected: ([^;]*)", message).group(1)
    reasons = {} if listed == "none" else {k: int(v) for k, v in (item.rsplit(" ", 1) for item in listed.split(", "))}
    return kept, seen, reasons


class Robot:
    """Publishes what a RealSense on a moving base does: colour (bgr8) + aligned 16UC1 depth + CameraInfo per frame,
    /tf with four transforms per message (odom → base_link → arm_base → arm_link → ee_link), and a two-message
    latched /tf_static (ee_link → camera_link → camera)."""

    def __init__(self, node, width=64, height=48):
        reliable = dict(reliability=ReliabilityPolicy.RELIABLE)
        self.width, self.height = width, height
        self.color = node.create_publisher(Image, COLOR, QoSProfile(depth=30, **reliable))
        self.depth = node.create_publisher(Image, DEPTH, QoSProfile(depth=30, **reliable))
        self.info = node.create_publisher(CameraInfo, INFO, QoSProfile(depth=30, **reliable))
        self.tf = node.create_publisher(TFMessage, "/tf", QoSProfile(depth=100, **reliable))
        self.tf_static = node.create_publisher(
            TFMessage, "/tf_static", QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL, **reliable))
        assert wait_for(lambda: all(p.get_subscription_count() > 0 for p in
                                    (self.color, self.depth, self.info, self.tf, self.tf_static)), 20)
        self.tf_static.publish(TFMessage(transforms=[self.link(0, "ee_link", "camera_link", (0.05, 0.0, 0.03))]))
        # camera_link (x forward) → camera optical frame (z forward): the usual -90° / -90° rotation
        self.tf_static.publish(TFMessage(transforms=[
            self.link(0, "camera_link", "camera", (0.0, 0.0, 0.0), (-0.5, 0.5, -0.5, 0.5))]))
        grid = np.add.outer(np.arange(height), np.arange(width))
        self.rgb = np.stack([grid % 256, (3 * grid) % 256, (grid // 2) % 256], axis=-1).astype(np.uint8)
        self.mm = (1000 + grid).astype(np.uint16)
        self.K = [50.0, 0.0, width / 2, 0.0, 50.0, height / 2, 0.0, 0.0, 1.0]

    @staticmethod
    def link(stamp, parent, child, xyz, xyzw=(0.0, 0.0, 0.0, 1.0)):
        t = TransformStamped(child_frame_id=child)
        t.header.frame_id = parent
        t.header.stamp.sec, t.header.stamp.nanosec = divmod(int(stamp), SECOND)
        t.transform.translation.x, t.transform.translation.y, t.transform.translation.z = map(float, xyz)
        r = t.transform.rotation
        r.x, r.y, r.z, r.w = map(float, xyzw)
        return t

    def publish_tf(self, stamp, t0, x=None):
        x = SPEED * (stamp - t0) / SECOND if x is None else x
        self.tf.publish(TFMessage(transforms=[
            self.link(stamp, "odom", "base_link", (x, 0.0, 0.0)), self.link(stamp, "base_link", "arm_base", (0.1, 0, .3)),
            self.link(stamp, "arm_base", "arm_link", (0.0, 0.0, 0.2)), self.link(stamp, "arm_link", "ee_link", (.2, 0, 0))]))

    def image(self, stamp, encoding, data):
        msg = Image(encoding=encoding, height=data.shape[0], width=data.shape[1],
                    step=data.strides[0] if data.size else 0)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp), SECOND)
        msg.header.frame_id = "camera"
        msg.data = data.tobytes()
        return msg

    def publish_frame(self, stamp, rgb=None, mm=None, K=None, size=None):
        rgb = self.rgb if rgb is None else rgb
        info = CameraInfo(width=self.width, height=self.height, k=self.K if K is None else K)
        if size is not None:
            info.width, info.height = size
        info.header.stamp = self.image(stamp, "bgr8", rgb).header.stamp
        self.info.publish(info)
        self.color.publish(self.image(stamp, "bgr8", rgb[..., ::-1].copy()))
        self.depth.publish(self.image(stamp, "16UC1", self.mm if mm is None else mm))

    def stream(self, t0, seconds, fps=15.0, tf_hz=50.0):
        """Real-time replay from stamp `t0`: TF arrives 2 ms after its stamp, camera frames 30 ms after theirs.
        Returns the published frame stamps."""
        events = [(k / tf_hz + 0.002, "tf", t0 + round(k * SECOND / tf_hz)) for k in range(int(seconds * tf_hz) + 2)]
        frames = [t0 + round(k * SECOND / fps) for k in range(int(seconds * fps))]
        events += [((s - t0) / SECOND + 0.030, "frame", s) for s in frames]
        start = time.monotonic()
        for at, kind, stamp in sorted(events):
            time.sleep(max(0.0, start + at - time.monotonic()))
            self.publish_tf(stamp, t0) if kind == "tf" else self.publish_frame(stamp)
        return frames

    def camera_x(self, stamp, t0):
        """World x of the camera at `stamp` (the chain adds 0.1 + 0.2 + 0.05 m along x to the base)."""
        return SPEED * (stamp - t0) / SECOND + 0.35


def test_bad_inputs_are_counted_logged_and_survived(tmp_path, ros_node):
    with start_recorder(tmp_path) as recorder:
        assert trigger("/m3/recorder/start").success
        robot = Robot(ros_node)
        t0, period = 100 * SECOND, SECOND // 10
        stamp = lambda k: t0 + k * period  # noqa: E731
        empty_rgb, empty_mm = np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0), np.uint16)
        nan_tf = robot.link(stamp(4), "odom", "base_link", (math.nan, 0.0, 0.0))
        zero_quat_tf = robot.link(stamp(4), "odom", "base_link", (0.4, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0))
        big_K = [500.0, 0.0, 320.0, 0.0, 500.0, 240.0, 0.0, 0.0, 1.0]
        frames = [
            dict(rgb=empty_rgb, mm=empty_mm),                      # 0: zero-size first frame
            dict(),                                                # 1: kept
            dict(rgb=robot.rgb[:24, :32].copy(), mm=robot.mm[:24, :32].copy()),  # 2: resized after a good frame
            dict(),                                                # 3: kept
            dict(bad_tf=True),                                     # 4: NaN / zero-quaternion TF: posed from 3 and 5
            dict(K=[0.0] * 9),                                     # 5: all-zero K
            dict(K=big_K, size=(640, 480)),                        # 6: 640x480 CameraInfo for a 64x48 image
            dict(K=big_K, size=(0, 0)),                            # 7: 640x480 intrinsics without a size
            dict(),                                                # 8: kept
        ]
        for k, frame in enumerate(frames):
            if frame.pop("bad_tf", False):
                robot.tf.publish(TFMessage(transforms=[nan_tf]))
                robot.tf.publish(TFMessage(transforms=[zero_quat_tf]))
            else:
                robot.publish_tf(stamp(k), t0, x=0.1 * k)
            time.sleep(0.05)
            robot.publish_frame(stamp(k), **frame)
            time.sleep(0.15)
        robot.publish_tf(stamp(9), t0, x=0.9)
        time.sleep(0.8)
        assert recorder.poll() is None
        stopped = trigger("/m3/recorder/stop")
        assert stopped.success, stopped.message
        kept, seen, reasons = counts(stopped.message)
        assert (kept, seen) == (4, 9), stopped.message
        assert reasons == {"bad_image": 2, "bad_camera_info": 3}, stopped.message
        assert "ignored 2 malformed transforms" in stopped.message
        status = _statuses(ros_node, lambda s: not s.recording, timeout=10)
        assert accounted(status) and (status.frames_seen, status.frames_kept, status.transforms_ignored) == (9, 4, 2)
        assert dict(zip(status.reject_reasons, status.reject_counts)) == reasons and status.message, status
        scene = Scene.load(stopped.message.split(" into ")[1].split(";")[0])
        np.testing.assert_allclose(scene.Ks[:, 0, 2], 32.0)  # never the 640x480 CameraInfo's cx = 320
        np.testing.assert_allclose(scene.c2w[:, 0, 3], [0.45, 0.65, 0.75, 1.15], atol=1e-9)  # frame 4 interpolated
        # the recorder goes on: the next scan keeps a good frame
        assert trigger("/m3/recorder/start").success
        robot.publish_tf(stamp(20), t0, x=2.0)
        time.sleep(0.05)
        robot.publish_frame(stamp(20))
        time.sleep(0.5)
        assert counts(trigger("/m3/recorder/stop").message)[:2] == (1, 1)
        output = stop_process(recorder)
    for said in ("image size 0x0 must be positive", "frame is 32x24 but this scan records 64x48",
                 "translation [nan, 0.0, 0.0] is not finite", "cannot be normalised", "fx, fy > 0",
                 "CameraInfo is for 640x480 images, the frame is 64x48", "principal point (320, 240) lies outside"):
        assert said in output, said


def test_a_failing_write_stops_the_scan_cleanly(tmp_path, ros_node):
    with start_recorder(tmp_path) as recorder:
        started = trigger("/m3/recorder/start")
        root = Path(started.message)
        root.mkdir(parents=True)
        (root / "rgb").write_text("a file where the rgb folder should be")  # every image write fails
        robot = Robot(ros_node)
        t0 = 100 * SECOND
        # /tf is best effort: samples sent before the recorder's reader has matched this writer are lost, so the
        # transforms run a second ahead of the first frame (a frame without its transform would be rejected stale)
        for k in range(-10, 0):
            robot.publish_tf(t0 + k * SECOND // 10, t0, x=0.0)
            time.sleep(0.1)
        for k in range(3):
            robot.publish_tf(t0 + k * SECOND // 10, t0, x=0.1 * k)
            robot.publish_frame(t0 + k * SECOND // 10)
            time.sleep(0.1)
        robot.publish_tf(t0 + 3 * SECOND // 10, t0)
        time.sleep(1.0)
        stopped = trigger("/m3/recorder/stop")  # the scan already stopped itself; the answer says why
        assert not stopped.success and "the scan stopped itself" in stopped.message, stopped.message
        assert "FileExistsError" in stopped.message
        kept, seen, reasons = counts(stopped.message)
        # the scan ended at the first failure: frames after it were not recorded
        assert kept == 0 and seen >= 1 and reasons == {"write_failed": seen}, stopped.message
        status = _statuses(ros_node, lambda s: not s.recording, timeout=10)
        assert accounted(status) and status.message.startswith("the scan stopped itself: writing the frame"), status
        assert trigger("/m3/recorder/start").success  # a new scan works
        assert trigger("/m3/recorder/stop").message.startswith("no frame kept")
        assert "scan stopped by a fault" in stop_process(recorder)


def _statuses(node, until, timeout: float):
    """Spin `node` on the recorder's latched status until `until(status)` holds; returns the last status (or None)."""
    import rclpy
    from m3_msgs.msg import RecorderStatus

    latest = []
    qos = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
    subscription = node.create_subscription(RecorderStatus, "m3/recorder/status", latest.append, qos)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (latest and until(latest[-1])):
        rclpy.spin_once(node, timeout_sec=0.2)
    node.destroy_subscription(subscription)
    return latest[-1] if latest else None


def accounted(status) -> bool:
    """The status's counts add up: seen = kept + rejected + pending, rejected = the sum of its reasons."""
    return status.frames_seen == status.frames_kept + status.frames_rejected + status.frames_pending and \
        status.frames_rejected == sum(status.reject_counts) and len(status.reject_reasons) == len(status.reject_counts)


def _play_scans(robot, node, t0s, seconds, fps=15.0):
    """One scan per stream start `t0s`: (t0, published frame stamps, stop answer, final status) each."""
    answers = []
    for t0 in t0s:
        assert trigger("/m3/recorder/start").success
        frames = robot.stream(t0, seconds, fps)
        _statuses(node, lambda s: s.frames_seen >= len(frames) and s.frames_pending == 0, timeout=10 + seconds / 10)
        stopped = trigger("/m3/recorder/stop")
        status = _statuses(node, lambda s: not s.recording, timeout=10)
        assert status is not None and not status.recording and accounted(status), status
        answers.append((t0, frames, stopped, status))
    return answers


def test_replays_twice_then_older_stamps_keep_every_posable_frame(tmp_path, ros_node):
    with start_recorder(tmp_path, "min_translation_m:=0.01") as recorder:  # 0.02 m per frame: every frame a keyframe
        robot = Robot(ros_node)
        answers = _play_scans(robot, ros_node, [1000 * SECOND, 1000 * SECOND, 400 * SECOND], seconds=2.0)
        output = stop_process(recorder)
    for t0, frames, stopped, status in answers:
        assert counts(stopped.message) == (len(frames), len(frames), {}), stopped.message
        assert (status.frames_seen, status.frames_kept, status.frames_rejected, status.frames_dropped) == \
            (len(frames), len(frames), 0, 0), status
        scene = Scene.load(stopped.message.split(" into ")[1].split(";")[0])
        assert list(scene.timestamps_ns) == frames
        np.testing.assert_allclose(scene.c2w[:, 0, 3], [robot.camera_x(s, t0) for s in frames], atol=1e-9)
    assert output.count("cleared the transform history") == 2  # the second replay and the older bag


def test_realsense_rate_stream_loses_no_frame(tmp_path, ros_node):
    """640x480 bgr8 + 16UC1 at 15 Hz, /tf at 50 Hz with four transforms per message, for 6 s: no frame is rejected
    (only keyframe choices), none is dropped, and the status says so."""
    with start_recorder(tmp_path, "wait_seconds:=1.0") as recorder:  # a keyframe every 0.08 m: every 4th-5th frame
        robot = Robot(ros_node, 640, 480)
        ((t0, frames, stopped, status),) = _play_scans(robot, ros_node, [1000 * SECOND], seconds=6.0)
        output = stop_process(recorder)
    kept, seen, reasons = counts(stopped.message)
    assert seen == len(frames) and set(reasons) <= {"no_motion"}, stopped.message + output
    assert kept + reasons.get("no_motion", 0) == seen and kept >= len(frames) // 6, stopped.message
    assert "dropped" not in stopped.message
    assert (status.frames_seen, status.frames_kept, status.frames_dropped, status.frames_pending) == \
        (seen, kept, 0, 0), status
    assert dict(zip(status.reject_reasons, status.reject_counts)) == reasons and status.message == "", status
    assert abs(status.measured_fps - 15.0) < 0.1, status
    scene = Scene.load(stopped.message.split(" into ")[1].split(";")[0])
    np.testing.assert_allclose(scene.c2w[:, 0, 3], [robot.camera_x(s, t0) for s in scene.timestamps_ns], atol=1e-9)


def test_interrupted_writes_leave_no_litter(tmp_path, ros_node):
    with start_recorder(tmp_path, "min_translation_m:=0.0") as recorder:
        root = Path(trigger("/m3/recorder/start").message)
        robot = Robot(ros_node, 320, 240)
        t0 = 100 * SECOND
        for k in range(10):
            robot.publish_tf(t0 + k * SECOND // 15, t0)
            robot.publish_frame(t0 + k * SECOND // 15)
            time.sleep(1 / 15)
        assert wait_for(lambda: (root / "frames.jsonl").exists() and (root / "frames.jsonl").read_text().count("\n") >= 3, 20)
        recorder.send_signal(signal.SIGKILL)
        recorder.wait(timeout=10)
    # what a kill inside a PNG write leaves (the kill above may or may not have landed inside one)
    (root / "rgb" / ".000005.png.k3x_9a2b.tmp").write_bytes(b"half a png")
    (root / "depth").mkdir(exist_ok=True)
    (root / "depth" / ".000005.png.0a1b2c3d.tmp").write_bytes(b"half a png")
    with start_recorder(tmp_path) as recorder:
        assert wait_for(lambda: not list(tmp_path.rglob("*.tmp")), 20), list(tmp_path.rglob("*.tmp"))
        output = stop_process(recorder)
    assert "temporary files of interrupted writes" in output
    assert len(Scene.load(root)) >= 3


def test_remove_stale_temps_removes_only_write_atomic_leftovers(tmp_path):
    write_atomic(tmp_path / "kept.txt", lambda h: h.write(b"data"))
    for name in (".memory_save.pt.ab_12xyz.tmp", ".000005.png.q1w2e3r4.tmp"):
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".x.png.abcdefgh.tmp").write_bytes(b"partial")
    for name in (".gitignore", ".config.tmp", "notes.tmp"):
        (tmp_path / name).write_bytes(b"mine")
    assert len(remove_stale_temps(tmp_path)) == 2
    assert (tmp_path / "sub" / ".x.png.abcdefgh.tmp").exists()
    assert len(remove_stale_temps(tmp_path, recursive=True)) == 1
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [".config.tmp", ".gitignore", "kept.txt",
                                                                          "notes.tmp"]


@pytest.mark.slow
def test_soak_30hz_rgbd_every_frame_accounted_for(tmp_path, ros_node):
    """10 minutes (M3_SOAK_SECONDS) of 640x480 RGB-D at 30 Hz with 50 Hz TF: every frame is kept or a keyframe
    choice, none is lost to TF timing or the disk, and the recorder's status accounts for each one."""
    seconds = float(os.environ.get("M3_SOAK_SECONDS", 600))
    with start_recorder(tmp_path, "wait_seconds:=1.0") as recorder:
        robot = Robot(ros_node, 640, 480)
        ((_, frames, stopped, status),) = _play_scans(robot, ros_node, [1000 * SECOND], seconds=seconds, fps=30.0)
        stop_process(recorder)
    kept, seen, reasons = counts(stopped.message)
    assert seen == len(frames) and kept + sum(reasons.values()) == seen, stopped.message
    assert set(reasons) <= {"no_motion"}, stopped.message
    assert kept >= int(seconds * SPEED / 0.09)  # a keyframe every 0.08 m, i.e. every 8-9 frames at 0.01 m a frame
    # the status (what an operator watches) holds the same account: every published frame seen, none dropped
    assert (status.frames_seen, status.frames_kept, status.frames_pending, status.frames_dropped) == \
        (len(frames), kept, 0, 0), status
    assert dict(zip(status.reject_reasons, status.reject_counts)) == reasons and status.transforms_ignored == 0, status
    assert abs(status.measured_fps - 30.0) < 0.1, status
