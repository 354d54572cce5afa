"""Memory server node: answers `/m3/locate` from a trained M3 memory.

Loads the checkpoint named by the `checkpoint` parameter, and again whenever the trainer announces a new one on
`m3/checkpoint`. A request's text is encoded with the memory's own model, searched from the requested view (or the
camera's latest pose from TF; without a live pose, in the whole memory by the direct 3D query, with up to
`max_search_views` of its training views rendered for the grasp, unless `search_without_camera` is false), lifted to 3D and returned in the requested frame; the answer is also published for the
arm (`m3/grasp_target`, PoseStamped), for people (`m3/heatmap`, Image; `m3/markers`, MarkerArray). Until a memory
exists every request gets `success: false` and a message; bad requests likewise, never a crash.
"""
from __future__ import annotations

import threading
import time

import numpy as np
from geometry_msgs.msg import Point, PoseStamped
from m3_msgs.msg import MemoryStatus
from m3_msgs.srv import Locate
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import String
from tf2_msgs.msg import TFMessage
from visualization_msgs.msg import Marker, MarkerArray

from m3_memory.core.checkpoint import load_memory
from m3_memory.core.errors import M3Error
from m3_memory.core.locate import locate, locate_in_memory, text_encoder
from m3_memory.core.query import DEFAULT_MAX_QUERY_CHARS, validate_query
from m3_memory.core.transforms import TransformBuffer
from m3_memory.ros.conversions import add_transforms, camera_info_K, matrix_to_pose, pose_to_matrix
from m3_memory.ros.qos import LATCHED, TF_QOS, TF_STATIC_QOS
from m3_memory.ros.spin import spin_node

NO_MEMORY = "no memory loaded yet: record a scan and train one with the /m3/train action"


class LoadedMemory:
    """A memory with the text encoder of the model it is queried through."""

    def __init__(self, path: str, model: str):
        self.path = path
        self.memory, _ = load_memory(path)
        self.model = model or self.memory.models[0]
        self.encoder = text_encoder(self.memory, self.model)


class MemoryServer(Node):
    def __init__(self):
        super().__init__("memory_server")
        p = self.declare_parameter
        self.max_query_chars = p("max_query_chars", DEFAULT_MAX_QUERY_CHARS).value
        self.model = p("model", "").value
        self.camera_frame = p("camera_frame", "camera_color_optical_frame").value
        self.max_pose_age_s = p("max_pose_age_seconds", 2.0).value
        self.method = p("method", "otsu").value
        self.grasp_mode = p("grasp_mode", "normal").value
        self.world_frame = p("world_frame", "world").value
        self.search_without_camera = p("search_without_camera", True).value
        self.max_search_views = p("max_search_views", 4).value
        self._lock = threading.Lock()
        self.loaded: LoadedMemory | None = None
        self.camera_info: CameraInfo | None = None
        self.tf = TransformBuffer(history_ns=30 * 10**9)
        self.status_pub = self.create_publisher(MemoryStatus, "m3/memory_status", LATCHED)
        self.grasp_pub = self.create_publisher(PoseStamped, "m3/grasp_target", 10)
        self.heatmap_pub = self.create_publisher(Image, "m3/heatmap", 1)
        self.marker_pub = self.create_publisher(MarkerArray, "m3/markers", 10)
        inputs = MutuallyExclusiveCallbackGroup()
        self.create_subscription(TFMessage, "/tf", lambda m: self.on_tf(m, False), TF_QOS, callback_group=inputs)
        self.create_subscription(TFMessage, "/tf_static", lambda m: self.on_tf(m, True), TF_STATIC_QOS,
                                 callback_group=inputs)
        self.create_subscription(CameraInfo, p("camera_info_topic", "/camera/color/camera_info").value,
                                 self.on_camera_info, 1, callback_group=inputs)
        self.create_subscription(String, "m3/checkpoint", lambda m: self.load(m.data), LATCHED,
                                 callback_group=MutuallyExclusiveCallbackGroup())
        # Reentrant: concurrent locate calls are served in parallel by the multi-threaded executor.
        self.create_service(Locate, "m3/locate", self.on_locate, callback_group=ReentrantCallbackGroup())
        checkpoint = p("checkpoint", "").value
        if checkpoint:
            self.load(checkpoint)
        else:
            self.publish_status(NO_MEMORY)
        self.get_logger().info("serving /m3/locate")

    # --- inputs -------------------------------------------------------------------------------------------------
    def on_tf(self, msg: TFMessage, static: bool) -> None:
        add_transforms(self.tf, msg, static, self.get_logger())

    def on_camera_info(self, msg: CameraInfo) -> None:
        self.camera_info = msg

    def load(self, path: str) -> None:
        try:
            loaded = LoadedMemory(path, self.model)
        except (M3Error, OSError) as exc:
            self.get_logger().error(f"cannot load memory {path}: {exc}")
            self.publish_status(f"cannot load {path}: {exc}")
            return
        with self._lock:
            self.loaded = loaded
        self.world_frame = loaded.memory.world_frame
        self.get_logger().info(f"memory {path} loaded: {len(loaded.memory.gaussians)} Gaussians, models "
                               f"{loaded.memory.models}, querying {loaded.model!r}")
        self.publish_status(f"loaded {path}")

    def publish_status(self, message: str) -> None:
        with self._lock:
            loaded = self.loaded
        status = MemoryStatus(stamp=self.get_clock().now().to_msg(), loaded=loaded is not None,
                              world_frame=self.world_frame, message=message)
        if loaded is not None:
            banks = loaded.memory.bank_sizes()
            status.checkpoint, status.models = loaded.path, list(banks)
            status.bank_sizes, status.num_gaussians = list(banks.values()), len(loaded.memory.gaussians)
        self.status_pub.publish(status)

    # --- locate -------------------------------------------------------------------------------------------------
    def views(self, request: Locate.Request, memory) -> tuple[np.ndarray | None, np.ndarray, int, int, str]:
        """Where to look from: `c2w [4, 4]`, `K [3, 3]`, width, height and a description. The request's pose, else the
        latest TF camera pose (intrinsics from CameraInfo, else the memory's training camera); `c2w` None (no pose, or
        a stale one) means the whole memory is searched (`locate_in_memory`), unless `search_without_camera` is off."""
        views = memory.views
        K, width, height = views["K"][0], views["width"], views["height"]
        if self.camera_info is not None:
            K, width, height = camera_info_K(self.camera_info), self.camera_info.width, self.camera_info.height
        q = request.view.orientation
        given = not (request.view == type(request.view)() or (q.x, q.y, q.z, q.w) == (0.0, 0.0, 0.0, 0.0))
        if given:
            return pose_to_matrix(request.view), K, width, height, "the requested view"
        try:
            return self.camera_pose(), K, width, height, "the camera's current view"
        except M3Error as exc:
            if not self.search_without_camera:
                raise
            return None, K, width, height, f"the whole memory and {self.max_search_views} of its training views ({exc})"

    def camera_pose(self) -> np.ndarray:
        """Latest camera-to-world pose `[4, 4]` from TF; M3Error when absent or older than `max_pose_age_seconds`."""
        stamp = self.tf.latest_common_stamp(self.world_frame, self.camera_frame)
        if stamp is None:
            raise M3Error(f"no camera pose: no TF chain {self.world_frame} → {self.camera_frame} has arrived; publish "
                          "the robot's TF or give `view` in the request")
        age = self.get_clock().now().nanoseconds - stamp
        if stamp and age > self.max_pose_age_s * 1e9:
            raise M3Error(f"the latest camera pose is {age / 1e9:.1f} s old (limit {self.max_pose_age_s} s): is the "
                          "robot's TF still being published?")
        return self.tf.lookup(self.world_frame, self.camera_frame, stamp)

    def on_locate(self, request: Locate.Request, response: Locate.Response) -> Locate.Response:
        started = time.monotonic()
        with self._lock:
            loaded = self.loaded
        try:
            query = validate_query(request.query, self.max_query_chars)
            if loaded is None:
                raise M3Error(NO_MEMORY)
            frame = request.frame_id or loaded.memory.world_frame
            c2w, K, width, height, source = self.views(request, loaded.memory)
            text = loaded.encoder.encode_text([query])[0]
            options = {"model": loaded.model, "method": self.method, "grasp_mode": self.grasp_mode}
            if c2w is None:
                result = locate_in_memory(loaded.memory, text, max_views=self.max_search_views, **options).result
            else:
                result = locate(loaded.memory, text, c2w[None], K[None], width, height, **options)
            frame_T_world = np.eye(4)
            if frame != loaded.memory.world_frame:
                stamp = self.tf.latest_common_stamp(frame, loaded.memory.world_frame)
                if stamp is None:
                    raise M3Error(f"unknown frame {frame!r}: no TF chain connects it to {loaded.memory.world_frame!r}")
                frame_T_world = self.tf.lookup(frame, loaded.memory.world_frame, stamp)
        except (M3Error, ValueError) as exc:
            response.success, response.message = False, str(exc)
            self.get_logger().warning(f"locate {request.query[:60]!r} failed: {exc}")
            return response
        grasp = frame_T_world @ result.grasp
        stamp = self.get_clock().now().to_msg()
        response.success, response.score = True, float(result.score)
        response.target.header.stamp = response.grasp_pose.header.stamp = stamp
        response.target.header.frame_id = response.grasp_pose.header.frame_id = frame
        response.target.point = Point(x=float(grasp[0, 3]), y=float(grasp[1, 3]), z=float(grasp[2, 3]))
        response.grasp_pose.pose = matrix_to_pose(grasp)
        heatmap = self.heatmap_image(result.heatmap, stamp)
        if request.return_heatmap:
            response.heatmap = heatmap
        elapsed_ms = (time.monotonic() - started) * 1000
        response.message = f"found {query!r} (score {result.score:.2f}) in {elapsed_ms:.0f} ms, searching {source}"
        self.grasp_pub.publish(response.grasp_pose)
        self.heatmap_pub.publish(heatmap)
        self.marker_pub.publish(self.markers(response, query))
        self.get_logger().info(response.message)
        return response

    def heatmap_image(self, heatmap: np.ndarray, stamp) -> Image:
        image = Image(height=heatmap.shape[0], width=heatmap.shape[1], encoding="32FC1", step=heatmap.shape[1] * 4)
        image.header.stamp, image.header.frame_id = stamp, self.camera_frame
        image.data = np.ascontiguousarray(heatmap, dtype=np.float32).tobytes()
        return image

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
        return MarkerArray(markers=[sphere, label])


def main(args: list[str] | None = None) -> int:
    return spin_node(MemoryServer, args, threads=4)
