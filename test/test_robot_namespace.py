"""A robot as a RealSense drives it, end to end through real processes: `ros2 launch m3_bringup scan_and_grasp.launch.py
namespace:=robot1 checkpoint:=... use_sim_time:=true color_transport:=compressed depth_transport:=compressedDepth`,
the camera under /robot1 replayed from a bag with best-effort (sensor-data QoS) JPEG and compressedDepth streams and
/clock (`m3 play --namespace robot1 --clock`); the operator's commands scan it, and `/robot1/m3/locate` gives a target,
from the camera's current view because the nodes keep the bag's time."""
import json
import re
import subprocess

import numpy as np
import pytest
import rclpy
from m3_msgs.msg import MemoryStatus, RecorderStatus
from m3_msgs.srv import Locate

from conftest import VENV_BIN, interrupt, run_command, wait_for
from m3_memory.core.scene import Scene
from m3_memory.ros.qos import LATCHED
from m3_memory.sim import demo_scene
from m3_memory.sim.bag import compress_bag

NS = "robot1"


@pytest.fixture(scope="module")
def realsense_bag(tmp_path_factory):
    """The tiny demo bag with the camera offered best effort, plus its JPEG colour and compressedDepth topics."""
    bag = tmp_path_factory.mktemp("bags") / "realsense"
    compress_bag(demo_scene("tiny") / "bag", bag, "jpeg", camera_reliability="best_effort")
    return bag


def spin_until(node, predicate, timeout: float):
    return wait_for(lambda: rclpy.spin_once(node, timeout_sec=0.1) or predicate(), timeout)


def test_a_namespaced_robot_with_compressed_best_effort_streams(tiny_memory, realsense_bag, ros_node, tmp_path):
    scene_root, memory_path, _ = tiny_memory
    duck = next(o for o in json.loads((scene_root / "objects.json").read_text())["objects"]
                if o["name"] == "yellow bath duck")
    memories, scans = [], []
    ros_node.create_subscription(MemoryStatus, f"/{NS}/m3/memory_status", memories.append, LATCHED)
    ros_node.create_subscription(RecorderStatus, f"/{NS}/m3/recorder/status", scans.append, LATCHED)
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        launch = subprocess.Popen(
            [str(VENV_BIN / "ros2"), "launch", "m3_bringup", "scan_and_grasp.launch.py", f"namespace:={NS}",
             f"checkpoint:={memory_path}", "use_sim_time:=true", "color_transport:=compressed",
             "depth_transport:=compressedDepth"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        assert spin_until(ros_node, lambda: any(m.loaded for m in memories), 120), log_path.read_text()
        # the camera streams the nodes read are the robot's, inside the namespace
        topics = {name for name, _ in ros_node.get_topic_names_and_types()}
        assert {f"/{NS}/camera/color/image_raw/compressed", f"/{NS}/camera/color/camera_info",
                f"/{NS}/camera/aligned_depth_to_color/image_raw/compressedDepth"} <= topics, topics
        assert not {t for t in topics if t.startswith("/camera")}, topics

        started = run_command("ros2", "service", "call", f"/{NS}/m3/recorder/start", "std_srvs/srv/Trigger", check=True)
        assert "success: true" in started.stdout, started.stdout
        run_command("m3", "play", str(realsense_bag), "--namespace", NS, "--clock",
                    "--wait-for", f"/{NS}/camera/color/image_raw/compressed", timeout=300, check=True)
        stopped = run_command("ros2", "service", "call", f"/{NS}/m3/recorder/stop", "std_srvs/srv/Trigger",
                              timeout=60, check=True)
        kept = re.search(r"kept (\d+) of (\d+) frames into (\S+?);", stopped.stdout)
        assert "success: true" in stopped.stdout and kept, stopped.stdout
        scene = Scene.load(kept[3])
        assert len(scene) == int(kept[1]) >= 3 and scene.root.resolve().is_relative_to((tmp_path / "scans").resolve())
        depth = scene.depth(0)
        assert np.isfinite(depth).any() and 0.2 < np.nanmedian(depth[depth > 0]) < 3.0   # metres, decoded from PNG
        assert spin_until(ros_node, lambda: scans and not scans[-1].recording and scans[-1].frames_kept == len(scene),
                          30)
        assert not {"no_path", "stale", "gap", "bad_image", "unsynchronised"} & set(scans[-1].reject_reasons), \
            scans[-1]

        # the memory served from the checkpoint answers; the camera's last pose (bag time) is fresh in sim time
        client = ros_node.create_client(Locate, f"/{NS}/m3/locate")
        assert client.wait_for_service(timeout_sec=30)
        future = client.call_async(Locate.Request(query="yellow bath duck"))
        rclpy.spin_until_future_complete(ros_node, future, timeout_sec=120)
        answer = future.result()
        assert answer.success, answer.message
        assert "searching the camera's current view" in answer.message, answer.message
        assert answer.heatmap_view.header.frame_id == "world"
        target = np.array([answer.target.point.x, answer.target.point.y, answer.target.point.z])
        assert np.linalg.norm(target - duck["center"]) < 0.1, (target, duck["center"], answer.message)
    finally:
        interrupt(launch, 40)
    assert launch.returncode == 0, log_path.read_text()
