"""Memory server node: answers `/m3/locate` from a trained M3 memory.

At start it serves the memory named by the `checkpoint` parameter (`ros2 launch ... checkpoint:=PATH`): the operator
chose that path, so it may lie anywhere, but it is read with the same safe loader and checks as any other (a
safetensors m3 memory; pickled `m3-memory/1` files are refused). Later memories arrive when the trainer announces one
on `m3/checkpoint`: announced paths must resolve under `memory_root` (the trainer's `output_root`) or this robot's
memories in `storage_root` (where the trainer keeps a scan goal's memory), anything else is refused. A new memory
replaces the old one only once it has loaded and passed the format's checks.

Each request is one call of the core query engine (`QueryEngine.answer`): this node only finds the view (the
request's pose, else the camera's latest pose from TF, else none: the whole memory is searched, unless
`search_without_camera` is false) and converts messages.

Names: every topic and service is relative (`m3/...`, `camera_info_topic` default `camera/color/camera_info`), so the
node's namespace moves them all; only `/tf` and `/tf_static` are absolute, as tf2's are. CameraInfo is read best-effort
(sensor-data QoS), which reliable and best-effort camera drivers both deliver to.

The status (`m3/memory_status`, latched) names the memory served, its Gaussians, banks, views and the scans that
built it (the memory's provenance), so a client can tell when a memory holding a given keyframe is served (live mode:
the trainer announces a new one every `publish_every_s`).

Answers are in the request's `frame_id`, else the `world_frame` parameter, else the memory's own frame. The answer is
also published for the arm (`m3/grasp_target`, PoseStamped), for people (`m3/heatmap`, Image; `m3/markers`,
MarkerArray) and as the matching Gaussians (`m3/matches`, PointCloud2); the memory itself is published latched as
`m3/memory_cloud` (every `cloud_decimation`-th Gaussian), and with `viewer_port` > 0 the browser viewer
(`m3 view`) follows the memory served. Until a memory exists every request gets `success: false`
and a message (a request that arrives while the first memory is loading waits for it, up to
`FIRST_LOAD_WAIT_SECONDS`); bad requests likewise, never a crash.
"""
from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from pathlib import Path

import numpy as np
from geometry_msgs.msg import Point, PoseStamped, Vector3
from m3_msgs.msg import Instance, MemoryStatus
from m3_msgs.srv import Locate
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header, String
from tf2_msgs.msg import TFMessage
from visualization_msgs.msg import Marker, MarkerArray

from m3_memory.core.checkpoint import load_memory
from m3_memory.core.engine import Answer, QueryEngine, QueryOptions
from m3_memory.core.errors import M3Error
from m3_memory.core.export import point_cloud as memory_points
from m3_memory.core.paths import confine
from m3_memory.core.query import validate_query
from m3_memory.core.storage import Storage
from m3_memory.core.transforms import TransformBuffer
from m3_memory.core.views import Camera
from m3_memory.ros.clouds import point_cloud
from m3_memory.ros.conversions import add_transforms, camera_info_K, matrix_to_pose, pose_to_matrix
from m3_memory.ros.qos import LATCHED, TF_QOS, TF_STATIC_QOS
from m3_memory.ros.spin import spin_node
from m3_memory.ros.transfer import MemorySync, own_robot

NO_MEMORY = "no memory loaded yet: record a scan and train one with the /m3/train action"
HEATMAP_VIEW_FRAME = "m3_heatmap_view"
FIRST_LOAD_WAIT_SECONDS = 20.0   # within ros2 service call's default 30 s timeout


class LoadedMemory:
    """A memory with its query engine (decoded Gaussians, text encoder loaded)."""

    def __init__(self, path: str, model: str):
        self.path = path
        self.memory, _ = load_memory(path)
        self.engine = QueryEngine(self.memory, model or None)


def scan_sources(memory) -> list[str]:
    """The scans that built `memory` (its provenance), each once, oldest first (a live scan adds an entry per update)."""
    return list(dict.fromkeys(entry["source"] for entry in memory.sources))


def view_matrix(pose) -> np.ndarray:
    """`[4, 4]` of a request's view pose; M3Error when it is not a finite rigid pose."""
    q, p = pose.orientation, pose.position
    values = np.array([q.x, q.y, q.z, q.w, p.x, p.y, p.z], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise M3Error("the view pose is not finite (NaN or infinite position or orientation)")
    largest = np.abs(values[:4]).max()
    if largest == 0:
        raise M3Error("the view's quaternion is zero")
    quat = values[:4] / largest        # scaled first: a huge but finite quaternion must not overflow its norm
    x, y, z, w = quat / np.linalg.norm(quat)
    return pose_to_matrix(type(pose)(position=pose.position, orientation=type(q)(x=x, y=y, z=z, w=w)))


class MemoryServer(Node):
    def __init__(self):
        super().__init__("memory_server")
        p = self.declare_parameter
        defaults = QueryOptions()
        self.options = QueryOptions(
            method=p("method", defaults.method).value, render=p("render", defaults.render).value,
            grasp_mode=p("grasp_mode", defaults.grasp_mode).value,
            max_instances=p("max_instances", defaults.max_instances).value,
            max_search_views=p("max_search_views", defaults.max_search_views).value,
            min_alpha=p("min_alpha", defaults.min_alpha).value,
            heatmap_scale=p("heatmap_scale", defaults.heatmap_scale).value,
            min_relevancy=p("min_relevancy", defaults.min_relevancy).value,
            max_query_chars=p("max_query_chars", defaults.max_query_chars).value)
        self.model = p("model", "").value
        self.camera_frame = p("camera_frame", "camera_color_optical_frame").value
        self.max_pose_age_s = p("max_pose_age_seconds", 2.0).value
        self.world_frame = p("world_frame", "").value   # frame of answers; empty = the memory's own
        self.search_without_camera = p("search_without_camera", True).value
        self.cloud_decimation = max(1, p("cloud_decimation", 10).value)
        self.memory_root = p("memory_root", "memories").value
        self.viewer_host, self.viewer_port = p("viewer_host", "127.0.0.1").value, p("viewer_port", 0).value
        self.viewer = None
        self._lock = threading.Lock()
        self._loading = 0   # loads in progress; a request arriving before the first memory waits for them
        self._load_ended = threading.Condition(self._lock)
        self.loaded: LoadedMemory | None = None
        self.camera_info: CameraInfo | None = None
        self.tf = TransformBuffer(history_ns=30 * 10**9)
        self.status_pub = self.create_publisher(MemoryStatus, "m3/memory_status", LATCHED)
        self.grasp_pub = self.create_publisher(PoseStamped, "m3/grasp_target", 10)
        self.heatmap_pub = self.create_publisher(Image, "m3/heatmap", 1)
        self.marker_pub = self.create_publisher(MarkerArray, "m3/markers", 10)
        self.matches_pub = self.create_publisher(PointCloud2, "m3/matches", 1)
        self.cloud_pub = self.create_publisher(PointCloud2, "m3/memory_cloud", LATCHED)
        inputs = MutuallyExclusiveCallbackGroup()
        self.create_subscription(TFMessage, "/tf", lambda m: self.on_tf(m, False), TF_QOS, callback_group=inputs)
        self.create_subscription(TFMessage, "/tf_static", lambda m: self.on_tf(m, True), TF_STATIC_QOS,
                                 callback_group=inputs)
        self.create_subscription(CameraInfo, p("camera_info_topic", "camera/color/camera_info").value,
                                 self.on_camera_info, qos_profile_sensor_data, callback_group=inputs)
        self.create_subscription(String, "m3/checkpoint", self.on_checkpoint, LATCHED,
                                 callback_group=MutuallyExclusiveCallbackGroup())
        # Reentrant: concurrent locate calls are served in parallel by the multi-threaded executor.
        self.create_service(Locate, "m3/locate", self.on_locate, callback_group=ReentrantCallbackGroup())
        checkpoint = p("checkpoint", "").value
        if checkpoint:
            self.load(str(Path(checkpoint).expanduser().resolve()))
        else:
            self.publish_status(NO_MEMORY)
        self.get_logger().info("serving /m3/locate")
        self.sync = MemorySync.from_parameters(self, self.load)   # memory_source set: memories from a worker
        # A trainer on this disk writes a directory goal's memory under memory_root (its output_root), a scan goal's
        # under this robot's memories in storage_root (declared with MemorySync): announced paths may lie in either.
        robot = self.get_parameter("robot").value or own_robot(self)
        self.announced_roots = [self.memory_root, Storage(self.get_parameter("storage_root").value).memories_dir(robot)]

    # --- inputs -------------------------------------------------------------------------------------------------
    def on_tf(self, msg: TFMessage, static: bool) -> None:
        add_transforms(self.tf, msg, static, self.get_logger())

    def on_camera_info(self, msg: CameraInfo) -> None:
        K = camera_info_K(msg)
        if msg.width == 0 or msg.height == 0 or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
            self.get_logger().warning(f"ignoring CameraInfo {msg.width}x{msg.height} with K {K.ravel().tolist()}: "
                                      "the size and focal lengths must be positive", throttle_duration_sec=5.0)
            return
        self.camera_info = msg

    def on_checkpoint(self, msg: String) -> None:
        try:
            path = str(confine(msg.data, self.announced_roots, "announced memory"))
        except M3Error as exc:
            self.get_logger().error(f"not loading {msg.data!r}: {exc}")
            self.publish_status(f"refused {msg.data!r}: {exc}")
            return
        self.load(path)

    def load(self, path: str) -> None:
        with self._lock:
            self._loading += 1
        loaded, problem = None, ""
        try:
            loaded = LoadedMemory(path, self.model)
        except (M3Error, OSError, ValueError) as exc:
            problem = str(exc)
        finally:
            with self._lock:
                self._loading -= 1
                self.loaded = loaded or self.loaded
                self._load_ended.notify_all()
        if loaded is None:
            self.get_logger().error(f"cannot load memory {path}: {problem}")
            self.publish_status(f"cannot load {path}: {problem}")
            return
        memory = loaded.memory
        self.get_logger().info(f"memory {path} loaded: {len(memory.gaussians)} Gaussians, {len(memory.views.c2w)} "
                               f"views of {len(scan_sources(memory)) or 'unrecorded'} scan(s), models "
                               f"{memory.models}, querying {loaded.engine.model!r}")
        self.publish_status(f"loaded {path}")
        cloud = memory_points(memory, self.cloud_decimation)
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=memory.world_frame)
        self.cloud_pub.publish(point_cloud(header, cloud.xyz, cloud.rgb))
        if self.viewer_port > 0:
            self.show(memory)

    def show(self, memory) -> None:
        """Start the browser viewer on the first memory, hand it each later one."""
        from m3_memory.viewer import Viewer

        try:
            if self.viewer is None:
                self.viewer = Viewer(memory, self.viewer_host, self.viewer_port, self.model or None)
                self.get_logger().info(f"viewer at {self.viewer.url}")
            else:
                self.viewer.set_memory(memory)
        except (M3Error, OSError) as exc:
            self.get_logger().error(f"viewer: {exc}")

    def publish_status(self, message: str) -> None:
        with self._lock:
            loaded = self.loaded
        status = MemoryStatus(stamp=self.get_clock().now().to_msg(), loaded=loaded is not None, message=message,
                              world_frame=self.world_frame)
        if loaded is not None:
            banks = loaded.memory.bank_sizes()
            status.world_frame = self.world_frame or loaded.memory.world_frame
            status.checkpoint, status.models = loaded.path, list(banks)
            status.bank_sizes, status.num_gaussians = list(banks.values()), len(loaded.memory.gaussians)
            status.num_views, status.sources = len(loaded.memory.views.c2w), scan_sources(loaded.memory)
        self.status_pub.publish(status)

    # --- locate -------------------------------------------------------------------------------------------------
    def view(self, request: Locate.Request, memory, engine: QueryEngine) -> tuple[Camera | None, str]:
        """Where to look from and a description: the request's pose, else the camera's latest pose from TF (intrinsics
        from CameraInfo, else the memory's training camera); None means the whole memory is searched."""
        K, width, height = engine.views.K[0], engine.views.width, engine.views.height
        if self.camera_info is not None:
            K, width, height = camera_info_K(self.camera_info), self.camera_info.width, self.camera_info.height
        q = request.view.orientation
        if not (request.view == type(request.view)() or (q.x, q.y, q.z, q.w) == (0.0, 0.0, 0.0, 0.0)):
            return Camera(view_matrix(request.view), K, width, height), "the requested view"
        try:
            return Camera(self.camera_pose(memory.world_frame), K, width, height), "the camera's current view"
        except M3Error as exc:
            if not self.search_without_camera:
                raise
            return None, f"the whole memory ({exc})"

    def camera_pose(self, world: str) -> np.ndarray:
        """Latest camera-to-world pose `[4, 4]` from TF; M3Error when absent or older than `max_pose_age_seconds`."""
        stamp = self.tf.latest_common_stamp(world, self.camera_frame)
        if stamp is None:
            raise M3Error(f"no camera pose: no TF chain {world} → {self.camera_frame} has arrived; publish "
                          "the robot's TF or give `view` in the request")
        age = self.get_clock().now().nanoseconds - stamp
        if stamp and age > self.max_pose_age_s * 1e9:
            raise M3Error(f"the latest camera pose is {age / 1e9:.1f} s old (limit {self.max_pose_age_s} s): is the "
                          "robot's TF still being published?")
        return self.tf.lookup(world, self.camera_frame, stamp)

    def frame_transform(self, frame: str, world: str) -> np.ndarray:
        """`[4, 4]` taking world points into `frame` (latest TF)."""
        if frame == world:
            return np.eye(4)
        stamp = self.tf.latest_common_stamp(frame, world)
        if stamp is None:
            raise M3Error(f"unknown frame {frame!r}: no TF chain connects it to {world!r}")
        return self.tf.lookup(frame, world, stamp)

    def on_locate(self, request: Locate.Request, response: Locate.Response) -> Locate.Response:
        started = time.monotonic()
        with self._lock:
            # the first memory is being loaded (just announced by the trainer): answer from it, not "no memory"
            self._load_ended.wait_for(lambda: self.loaded is not None or not self._loading, FIRST_LOAD_WAIT_SECONDS)
            loaded = self.loaded
        try:
            validate_query(request.query, self.options.max_query_chars)   # a bad query is told so before all else
            if loaded is None:
                raise M3Error(NO_MEMORY)
            options = dataclasses.replace(self.options, max_instances=request.max_instances or
                                          self.options.max_instances,
                                          negatives=tuple(request.negatives) or self.options.negatives)
            frame = request.frame_id or self.world_frame or loaded.memory.world_frame
            view, source = self.view(request, loaded.memory, loaded.engine)
            answer = loaded.engine.answer(request.query, view, options)
            frame_T_world = self.frame_transform(frame, loaded.memory.world_frame)
        except (M3Error, ValueError) as exc:
            return self.refuse(request, response, str(exc))
        except Exception as exc:   # a fault of ours: answer and log it rather than let rclpy end the process
            self.get_logger().error(f"locate {request.query[:60]!r}: {traceback.format_exc()}")
            return self.refuse(request, response, f"internal error ({type(exc).__name__}: {exc}); see the server log")
        self.fill(response, loaded, answer, frame, frame_T_world, request.return_heatmap,
                  source == "the camera's current view")
        notes = "; ".join(answer.notes)
        response.message = (f"found {answer.query!r} (score {answer.score:.2f}, {len(answer.instances)} instance(s)) "
                            f"in {(time.monotonic() - started) * 1000:.0f} ms, searching {source}"
                            + (f"; {notes}" if notes else ""))
        self.get_logger().info(response.message)
        return response

    def refuse(self, request: Locate.Request, response: Locate.Response, why: str) -> Locate.Response:
        response.success, response.message = False, why
        self.get_logger().warning(f"locate {request.query[:60]!r} failed: {why}")
        return response

    def fill(self, response: Locate.Response, loaded: LoadedMemory, answer: Answer, frame: str, frame_T_world: np.ndarray,
             return_heatmap: bool, live_camera: bool) -> None:
        """The answer as the response's messages (and the published topics), in `frame`."""
        stamp = self.get_clock().now().to_msg()
        header = Header(stamp=stamp, frame_id=frame)
        grasp = frame_T_world @ answer.grasp
        response.success, response.score = True, float(answer.score)
        response.target.header = response.grasp_pose.header = header
        response.target.point = Point(x=float(grasp[0, 3]), y=float(grasp[1, 3]), z=float(grasp[2, 3]))
        response.grasp_pose.pose = matrix_to_pose(grasp)
        for instance in answer.instances:
            point = frame_T_world[:3, :3] @ instance.point + frame_T_world[:3, 3]
            response.instances.append(Instance(
                position=Point(x=float(point[0]), y=float(point[1]), z=float(point[2])),
                extent=Vector3(x=float(instance.extent[0]), y=float(instance.extent[1]), z=float(instance.extent[2])),
                score=float(instance.score), views_seen=instance.views_seen, num_gaussians=len(instance.gaussians)))
        heatmap = Image()
        if answer.heatmap is not None:
            camera = answer.heatmap_camera
            heatmap_frame = self.camera_frame if live_camera else HEATMAP_VIEW_FRAME
            heatmap = Image(height=camera.height, width=camera.width, encoding="32FC1", step=camera.width * 4,
                            header=Header(stamp=stamp, frame_id=heatmap_frame))
            heatmap.data = np.ascontiguousarray(answer.heatmap, dtype=np.float32).tobytes()
            response.heatmap_camera = CameraInfo(header=heatmap.header, width=camera.width, height=camera.height,
                                                 k=camera.K.ravel().tolist(), distortion_model="plumb_bob")
            response.heatmap_view.header = header
            response.heatmap_view.pose = matrix_to_pose(frame_T_world @ camera.c2w)
            self.heatmap_pub.publish(heatmap)
        if return_heatmap:
            response.heatmap = heatmap
        self.grasp_pub.publish(response.grasp_pose)
        self.marker_pub.publish(self.markers(response, answer.query))
        matches = np.concatenate([i.gaussians for i in answer.instances]).astype(np.int64)
        world_header = Header(stamp=stamp, frame_id=loaded.memory.world_frame)
        scores = answer.gaussian_scores[matches][:, None]
        self.matches_pub.publish(point_cloud(world_header, loaded.engine.means[matches].cpu().numpy(),
                                             np.concatenate([np.ones_like(scores), scores, 0 * scores], axis=1)))

    def markers(self, response: Locate.Response, query: str) -> MarkerArray:
        sphere = Marker(header=response.grasp_pose.header, ns="m3", id=0, type=Marker.SPHERE, action=Marker.ADD)
        sphere.pose = response.grasp_pose.pose
        sphere.scale.x = sphere.scale.y = sphere.scale.z = 0.05
        sphere.color.r, sphere.color.g, sphere.color.a = 1.0, 0.8, 0.9
        label = Marker(header=response.grasp_pose.header, ns="m3", id=1, type=Marker.TEXT_VIEW_FACING,
                       action=Marker.ADD, text=query)
        label.pose = response.grasp_pose.pose
        label.pose.position.z += 0.08
        label.scale.z = 0.04
        label.color.r = label.color.g = label.color.b = label.color.a = 1.0
        boxes = []
        for i, instance in enumerate(response.instances):
            box = Marker(header=response.grasp_pose.header, ns="m3_instances", id=i, type=Marker.CUBE,
                         action=Marker.ADD)
            box.pose.position, box.pose.orientation.w = instance.position, 1.0
            box.scale.x, box.scale.y, box.scale.z = (max(v, 0.01) for v in (instance.extent.x, instance.extent.y,
                                                                              instance.extent.z))
            box.color.g, box.color.b, box.color.a = 0.8, 1.0, 0.3
            boxes.append(box)
        return MarkerArray(markers=[sphere, label, *boxes])


def main(args: list[str] | None = None) -> int:
    return spin_node(MemoryServer, args, threads=4)
