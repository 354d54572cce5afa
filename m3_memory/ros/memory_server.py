"""Memory server node: answers `/m3/locate` and publishes the memory's status.

Until a memory checkpoint is loaded every locate request is answered with `success: false` and a message saying how to
get one; malformed requests (empty or oversized query) are answered the same way, never by crashing.
"""
from __future__ import annotations

from m3_msgs.msg import MemoryStatus
from m3_msgs.srv import Locate
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node

from m3_memory.core.errors import M3Error
from m3_memory.core.query import DEFAULT_MAX_QUERY_CHARS, validate_query
from m3_memory.ros.qos import LATCHED
from m3_memory.ros.spin import spin_node

NO_MEMORY = "no memory loaded yet: record a scan and train one with the /m3/train action"


class MemoryServer(Node):
    def __init__(self):
        super().__init__("memory_server")
        self.world_frame = self.declare_parameter("world_frame", "world").value
        self.max_query_chars = self.declare_parameter("max_query_chars", DEFAULT_MAX_QUERY_CHARS).value
        self.status_pub = self.create_publisher(MemoryStatus, "m3/memory_status", LATCHED)
        # Reentrant: concurrent locate calls are served in parallel by the multi-threaded executor.
        self.create_service(Locate, "m3/locate", self.on_locate, callback_group=ReentrantCallbackGroup())
        self.publish_status(NO_MEMORY)
        self.get_logger().info("serving /m3/locate (no memory loaded yet)")

    def publish_status(self, message: str) -> None:
        self.status_pub.publish(MemoryStatus(
            stamp=self.get_clock().now().to_msg(), loaded=False, world_frame=self.world_frame, message=message))

    def on_locate(self, request: Locate.Request, response: Locate.Response) -> Locate.Response:
        try:
            query = validate_query(request.query, self.max_query_chars)
        except M3Error as exc:
            response.success, response.message = False, str(exc)
            self.get_logger().warning(f"locate rejected: {exc}")
            return response
        # Loading a trained memory arrives with the core's checkpoint format; until then there is nothing to search.
        response.success, response.message = False, NO_MEMORY
        self.get_logger().info(f"locate {query!r}: {NO_MEMORY}")
        return response


def main(args: list[str] | None = None) -> int:
    return spin_node(MemoryServer, args)
