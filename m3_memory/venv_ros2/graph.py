"""One short-lived rclpy node for command-line look-ups on the ROS graph."""
from __future__ import annotations

import contextlib
import time

# DDS discovery of a freshly started node takes a few hundred ms (seconds on a loaded machine); graph queries before
# that see only the node itself.
DISCOVERY_TIMEOUT = 5.0
STABLE_SECONDS = 0.5


@contextlib.contextmanager
def cli_node(name: str = "m3_ros2_cli"):
    import rclpy
    from rclpy.node import Node

    rclpy.init()
    node = Node(name, start_parameter_services=False)
    try:
        yield node
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def wait_for_graph(node, predicate, timeout: float) -> bool:
    """Spin `node` until `predicate()` holds or `timeout` seconds pass."""
    import rclpy

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        rclpy.spin_once(node, timeout_sec=0.05)
    return predicate()


def settle(node, timeout: float = DISCOVERY_TIMEOUT) -> None:
    """Spin until other nodes are discovered and the graph has stopped changing for a moment (or `timeout`)."""
    def snapshot():
        return (sorted(node.get_node_names_and_namespaces()), sorted(node.get_topic_names_and_types()),
                sorted(node.get_service_names_and_types()))

    deadline = time.monotonic() + timeout
    wait_for_graph(node, lambda: len(node.get_node_names_and_namespaces()) > 1, timeout)
    last, stable_since = snapshot(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - stable_since < STABLE_SECONDS:
        wait_for_graph(node, lambda: False, 0.1)
        current = snapshot()
        if current != last:
            last, stable_since = current, time.monotonic()


def lookup_type(names_and_types, name: str) -> str | None:
    for found, types in names_and_types:
        if found == name and types:
            return types[0]
    return None
