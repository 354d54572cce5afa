"""Recorder node: start/stop a scan and report what it has seen.

Services `m3/recorder/start` and `m3/recorder/stop` (std_srvs/Trigger); status on `m3/recorder/status` (latched,
m3_msgs/RecorderStatus, 1 Hz and on every change). While recording it counts the colour frames that arrive.
"""
from __future__ import annotations

from m3_msgs.msg import RecorderStatus
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_srvs.srv import Trigger

from m3_memory.ros.qos import LATCHED
from m3_memory.ros.spin import spin_node


class Recorder(Node):
    def __init__(self):
        super().__init__("recorder")
        self.output_root = self.declare_parameter("output_root", "scans").value
        color_topic = self.declare_parameter("color_topic", "/camera/color/image_raw").value
        self.recording = False
        self.frames_seen = 0
        self.status_pub = self.create_publisher(RecorderStatus, "m3/recorder/status", LATCHED)
        self.create_subscription(Image, color_topic, self.on_color, qos_profile_sensor_data)
        self.create_service(Trigger, "m3/recorder/start", self.on_start)
        self.create_service(Trigger, "m3/recorder/stop", self.on_stop)
        self.create_timer(1.0, self.publish_status)
        self.publish_status()
        self.get_logger().info(f"ready: call m3/recorder/start to scan (colour images from {color_topic})")

    def on_color(self, _msg: Image) -> None:
        if self.recording:
            self.frames_seen += 1

    def on_start(self, _request, response: Trigger.Response) -> Trigger.Response:
        if self.recording:
            response.success, response.message = False, "already recording: call m3/recorder/stop first"
        else:
            self.recording, self.frames_seen = True, 0
            response.success, response.message = True, "recording"
        self.publish_status()
        return response

    def on_stop(self, _request, response: Trigger.Response) -> Trigger.Response:
        if not self.recording:
            response.success, response.message = False, "not recording: call m3/recorder/start first"
        else:
            self.recording = False
            response.success, response.message = True, f"stopped after {self.frames_seen} frames"
        self.publish_status()
        return response

    def publish_status(self) -> None:
        self.status_pub.publish(RecorderStatus(
            stamp=self.get_clock().now().to_msg(), recording=self.recording, scene_dir=self.output_root,
            frames_seen=self.frames_seen))


def main(args: list[str] | None = None) -> int:
    return spin_node(Recorder, args)
