"""Blocking service calls from short-lived processes (command-line tools, tests)."""
from __future__ import annotations

import rclpy
from rclpy.node import Node


def call_service(srv_type, name: str, request, timeout: float, node_name: str = "m3_client"):
    """Call `name` once and return the response; TimeoutError when the server is absent or silent."""
    if not rclpy.ok():
        rclpy.init()
    node = Node(node_name, start_parameter_services=False)
    try:
        client = node.create_client(srv_type, name)
        if not client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f"service {name} is not available after {timeout:.0f} s (is the memory server running, "
                               "in the same ROS_DOMAIN_ID?)")
        future = client.call_async(request)
        rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
        if not future.done():
            raise TimeoutError(f"service {name} did not answer within {timeout:.0f} s")
        return future.result()
    finally:
        node.destroy_node()
