"""A robot configured by launch arguments alone: `ros2 launch m3_bringup scan_and_grasp.launch.py namespace:=robot1
checkpoint:=... world_frame:=... use_sim_time:=true ...` as a real process; every parameter lands in its nodes (read
back through their parameter services and seen in what they do), `/robot1/m3/locate` answers from the checkpoint
without any training, every name moved into the namespace, and wrong arguments are refused with a message."""
import json
import signal

import numpy as np
import pytest
import rclpy
from builtin_interfaces.msg import Time
from geometry_msgs.msg import TransformStamped
from m3_msgs.msg import MemoryStatus
from m3_msgs.srv import Locate
from rcl_interfaces.srv import GetParameters
from rclpy.action import get_action_names_and_types
from rclpy.parameter import parameter_value_to_python
from rosgraph_msgs.msg import Clock
from tf2_msgs.msg import TFMessage

from conftest import ros2_launch, run_command, wait_for
from m3_memory.ros.qos import LATCHED, TF_STATIC_QOS

NS = "robot1"
SIM_SECONDS = 1234          # the /clock the test publishes: the nodes' time under use_sim_time
ODOM_TO_WORLD = (1.0, 2.0, 0.0)   # world sits here in odom (world_frame:=odom makes answers come in odom)
ROBOT = {
    "namespace": NS, "world_frame": "odom", "use_sim_time": "true", "models": "m3-tinyvlm", "device": "cpu",
    "color_topic": "head/color/image_raw", "depth_topic": "head/depth/image_rect_raw",
    "depth_transport": "compressedDepth", "image_reliability": "best_effort",
    "camera_info_topic": "head/color/camera_info", "camera_frame": "head_color_optical_frame",
    "scan_root": "robot_scans", "memory_root": "robot_memories",
}


def call(node, srv_type, name: str, request, timeout: float = 60.0):
    client = node.create_client(srv_type, name)
    try:
        assert client.wait_for_service(timeout_sec=timeout), f"no service {name}"
        future = client.call_async(request)
        rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
        assert future.done(), f"{name} did not answer"
        return future.result()
    finally:
        node.destroy_client(client)


def parameters(node, node_name: str, names: list[str]) -> dict:
    response = call(node, GetParameters, f"/{NS}/{node_name}/get_parameters", GetParameters.Request(names=names))
    assert len(response.values) == len(names), f"{node_name} lacks one of the parameters {names}"
    return {name: parameter_value_to_python(value) for name, value in zip(names, response.values)}


@pytest.fixture
def launched(tiny_memory, tmp_path):
    """The bringup started for robot1 from tmp_path, serving the tiny memory; yields (process, log path, memory)."""
    arguments = [f"{k}:={v}" for k, v in {**ROBOT, "checkpoint": tiny_memory[1]}.items()]
    with ros2_launch("m3_bringup", "scan_and_grasp.launch.py", *arguments, cwd=tmp_path) as process:
        yield process, tmp_path / "launch.log", tiny_memory


def test_launch_arguments_configure_a_namespaced_robot(launched, ros_node, tmp_path):
    process, log_path, (scene_root, memory_path, _) = launched
    clock = ros_node.create_publisher(Clock, "/clock", 10)
    static = ros_node.create_publisher(TFMessage, "/tf_static", TF_STATIC_QOS)
    statuses = []
    ros_node.create_subscription(MemoryStatus, f"/{NS}/m3/memory_status", statuses.append, LATCHED)
    ros_node.create_timer(0.1, lambda: clock.publish(Clock(clock=Time(sec=SIM_SECONDS))))
    link = TransformStamped()
    link.header.frame_id, link.child_frame_id = "odom", "world"
    (link.transform.translation.x, link.transform.translation.y,
     link.transform.translation.z), link.transform.rotation.w = ODOM_TO_WORLD, 1.0
    static.publish(TFMessage(transforms=[link]))

    def loaded():
        rclpy.spin_once(ros_node, timeout_sec=0.2)
        return any(s.loaded for s in statuses)

    assert wait_for(loaded, 120), log_path.read_text()
    status = next(s for s in statuses if s.loaded)
    assert status.checkpoint == str(memory_path.resolve()) and status.world_frame == "odom"

    # every name moved into the namespace; only tf2's topics (and ROS's own) stay global
    nodes = {f"{ns.rstrip('/')}/{name}" for name, ns in ros_node.get_node_names_and_namespaces()}
    assert {f"/{NS}/recorder", f"/{NS}/trainer", f"/{NS}/memory_server"} <= nodes, nodes
    topics = {name for name, _ in ros_node.get_topic_names_and_types()}
    assert {f"/{NS}/head/color/image_raw", f"/{NS}/head/depth/image_rect_raw/compressedDepth",
            f"/{NS}/head/color/camera_info",
            f"/{NS}/m3/recorder/status", f"/{NS}/m3/memory_status", f"/{NS}/m3/checkpoint"} <= topics, topics
    outside = {t for t in topics if not t.startswith(f"/{NS}/")} - {"/tf", "/tf_static", "/clock", "/rosout",
                                                                      "/parameter_events"}
    assert not outside, outside
    services = {name for name, _ in ros_node.get_service_names_and_types()}
    assert {f"/{NS}/m3/locate", f"/{NS}/m3/recorder/start", f"/{NS}/m3/recorder/stop"} <= services, services
    assert not {s for s in services if s.startswith("/m3/")}
    assert f"/{NS}/m3/train" in {name for name, _ in get_action_names_and_types(ros_node)}

    # each launch argument is the parameter of every node it concerns, over the YAML's value
    for name in ("recorder", "trainer", "memory_server"):
        assert parameters(ros_node, name, ["use_sim_time"]) == {"use_sim_time": True}
    assert parameters(ros_node, "recorder", ["world_frame", "color_topic", "depth_topic", "camera_info_topic",
                                             "depth_transport", "image_reliability", "output_root"]) == {
        "world_frame": "odom", "color_topic": ROBOT["color_topic"], "depth_topic": ROBOT["depth_topic"],
        "camera_info_topic": ROBOT["camera_info_topic"], "depth_transport": "compressedDepth",
        "image_reliability": "best_effort", "output_root": "robot_scans"}
    assert parameters(ros_node, "trainer", ["models", "device", "scene_roots", "output_root"]) == {
        "models": ["m3-tinyvlm"], "device": "cpu", "scene_roots": ["robot_scans"], "output_root": "robot_memories"}
    assert parameters(ros_node, "memory_server", ["world_frame", "checkpoint", "camera_info_topic", "camera_frame",
                                                  "memory_root", "max_search_views"]) == {
        "world_frame": "odom", "checkpoint": str(memory_path.resolve()),
        "camera_info_topic": ROBOT["camera_info_topic"],
        "camera_frame": "head_color_optical_frame", "memory_root": "robot_memories",
        "max_search_views": 4}   # not a launch argument: memory_server.yaml's value stays

    # answered from the checkpoint, untrained: in odom (world_frame), stamped with the simulated clock
    duck = next(o for o in json.loads((scene_root / "objects.json").read_text())["objects"]
                if o["name"] == "yellow bath duck")
    answer = call(ros_node, Locate, f"/{NS}/m3/locate", Locate.Request(query="yellow bath duck"))
    assert answer.success, answer.message
    assert answer.target.header.frame_id == "odom" and answer.target.header.stamp.sec == SIM_SECONDS
    in_world = call(ros_node, Locate, f"/{NS}/m3/locate", Locate.Request(query="yellow bath duck", frame_id="world"))
    target = np.array([answer.target.point.x, answer.target.point.y, answer.target.point.z])
    world_target = np.array([in_world.target.point.x, in_world.target.point.y, in_world.target.point.z])
    np.testing.assert_allclose(target - world_target, ODOM_TO_WORLD, atol=1e-4)
    assert np.linalg.norm(world_target - duck["center"]) < 0.1, (world_target, duck["center"])
    assert "searching the whole memory" in answer.message   # no camera pose in TF: use the memory, not a stale view
    assert not (tmp_path / "robot_memories").exists() or not any((tmp_path / "robot_memories").iterdir())

    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=40) == 0, log_path.read_text()


def test_memory_server_launch_refuses_a_file_that_is_not_a_memory(ros_node, tmp_path):
    """An operator's checkpoint may lie anywhere, but must still be an m3 memory: a pickle is not loaded."""
    junk = tmp_path / "memory.pt"
    junk.write_bytes(b"\x80\x04K\x01.")   # a pickle of the number 1
    statuses = []
    ros_node.create_subscription(MemoryStatus, "/robot2/m3/memory_status", statuses.append, LATCHED)
    with ros2_launch("m3_memory", "memory_server.launch.py", "namespace:=robot2", f"checkpoint:={junk}",
                     cwd=tmp_path) as process:
        assert wait_for(lambda: rclpy.spin_once(ros_node, timeout_sec=0.2) or statuses, 90)
        assert not statuses[-1].loaded and f"cannot load {junk}" in statuses[-1].message
        answer = call(ros_node, Locate, "/robot2/m3/locate", Locate.Request(query="yellow bath duck"))
        assert not answer.success and "no memory loaded" in answer.message
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=40) == 0, (tmp_path / "launch.log").read_text()


def test_announced_memories_load_from_the_trainers_folders_of_this_robot_only(tiny_memory, ros_node, tmp_path):
    """The trainer on this disk announces a scan goal's memory under <storage_root>/<robot>/memories: the server of
    robot2 loads its own robot's, and refuses another robot's and anything outside its roots."""
    import shutil

    from std_msgs.msg import String

    paths = {}
    for robot in ("robot2", "robot3"):
        paths[robot] = tmp_path / "storage" / robot / "memories" / "scan_1.pt"
        paths[robot].parent.mkdir(parents=True)
        shutil.copy(tiny_memory[1], paths[robot])
    statuses = []
    ros_node.create_subscription(MemoryStatus, "/robot2/m3/memory_status", statuses.append, LATCHED)
    announce = ros_node.create_publisher(String, "/robot2/m3/checkpoint", LATCHED)
    with ros2_launch("m3_memory", "memory_server.launch.py", "namespace:=robot2",
                     f"storage_root:={tmp_path / 'storage'}", cwd=tmp_path) as process:
        assert wait_for(lambda: rclpy.spin_once(ros_node, timeout_sec=0.2) or statuses, 90)
        for path, expected in ((paths["robot3"], "refused"), (tiny_memory[1], "refused"), (paths["robot2"], "loaded")):
            count = len(statuses)
            announce.publish(String(data=str(path)))
            assert wait_for(lambda: rclpy.spin_once(ros_node, timeout_sec=0.2) or len(statuses) > count, 90)
            assert statuses[-1].message.startswith(f"{expected} "), (path, statuses[-1].message)
        assert statuses[-1].loaded and statuses[-1].checkpoint == str(paths["robot2"].resolve())
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=40) == 0, (tmp_path / "launch.log").read_text()


@pytest.mark.parametrize("argument, message", [
    ("expected_fps:=15", "unknown launch argument 'expected_fps'; declared: config_dir, namespace, log_level, "
                         "use_sim_time, checkpoint, world_frame"),
    ("checkpoint:=missing.pt", "launch argument checkpoint:='missing.pt': no file at"),
    ("use_sim_time:=sometimes", "use_sim_time:='sometimes' must be true or false"),
    ("device:=tpu", "device:='tpu' must be auto, cpu, cuda or cuda:N"),
    ("models:=clip,,dinov2", "must be comma-separated names"),
    ("world_frame:=/map", "is not a TF frame id"),
    ("depth_transport:=theora", "depth_transport:='theora' must be one of raw, compressed, compressedDepth"),
    ("color_topic:=camera color", "is not a topic name"),
    ("viewer_port:=eighty", "viewer_port:='eighty' must be an integer"),
    ("nodes:=recorder,planner", "nodes:='recorder,planner' must name some of memory_server, recorder, trainer"),
])
def test_wrong_launch_arguments_are_refused_before_any_node_starts(argument, message, tmp_path):
    result = run_command("ros2", "launch", "m3_bringup", "scan_and_grasp.launch.py", argument, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "process started" not in result.stdout
