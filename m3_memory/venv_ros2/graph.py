"""Waiting for the ROS graph of a short-lived command-line node (`graph_client.client_node`) to be discovered."""
from __future__ import annotations

import time

# A fresh process discovers the graph over seconds, one participant at a time, each when its process answers our
# announcement: with the bringup running on this project's loaded 2-core machine the last of three node processes
# came up to 1.9 s after the first (8 probes), and a process's topics may be known before its node name (its
# /rosout publisher then belongs to "_NODE_NAME_UNKNOWN_"). A process may also not answer at all and be heard only at
# its next periodic announcement (Fast DDS: every ANNOUNCEMENT_SECONDS): the recorder, all its nodes and endpoints
# at once, 2.83-2.97 s after the probe started in 3 of 55 probes, after 2.5 s of quiet. A listing therefore waits
# until the graph, those owner names included, has been quiet for SETTLE_SECONDS, or for GAP_FACTOR times the longest
# gap seen between two discoveries when that is longer, and until one announcement period (with a margin) has passed
# and every /rosout publisher's node is named, within SETTLE_TIMEOUT; an empty graph is waited on for
# FIRST_NODE_TIMEOUT.
FIRST_NODE_TIMEOUT = 5.0
SETTLE_SECONDS = 2.5
GAP_FACTOR = 2.0
SETTLE_TIMEOUT = 10.0
ANNOUNCEMENT_SECONDS = 3.0
ANNOUNCEMENT_MARGIN = 0.5
UNKNOWN_NODE = "_NODE_NAME_UNKNOWN_"


def wait_for_graph(node, predicate, timeout: float) -> bool:
    """Spin `node` until `predicate()` holds or `timeout` seconds pass."""
    import rclpy

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        rclpy.spin_once(node, timeout_sec=0.05)
    return predicate()


def graph_snapshot(node) -> tuple:
    """Everything a listing prints (nodes, topics and services with their types), and the node owning each /rosout
    publisher (every node has one), whose name is known only once that node's process has been fully discovered."""
    return (sorted(node.get_node_names_and_namespaces()), sorted(node.get_topic_names_and_types()),
            sorted(node.get_service_names_and_types()),
            sorted(info.node_name for info in node.get_publishers_info_by_topic("/rosout")))


def settle(node, first_node_timeout: float = FIRST_NODE_TIMEOUT, timeout: float = SETTLE_TIMEOUT) -> None:
    """Spin until other nodes are discovered and the graph has stopped changing (see SETTLE_SECONDS), or `timeout`."""
    start = time.monotonic()
    deadline, heard_all = start + timeout, start + ANNOUNCEMENT_SECONDS + ANNOUNCEMENT_MARGIN
    wait_for_graph(node, lambda: len(node.get_node_names_and_namespaces()) > 1, first_node_timeout)
    last, changed, longest_gap = graph_snapshot(node), time.monotonic(), 0.0

    def settled() -> bool:
        now = time.monotonic()
        return (now >= heard_all and UNKNOWN_NODE not in last[3]
                and now - changed >= max(SETTLE_SECONDS, GAP_FACTOR * longest_gap))

    while time.monotonic() < deadline and not settled():
        wait_for_graph(node, lambda: False, 0.05)
        current = graph_snapshot(node)
        if current != last:
            now = time.monotonic()
            longest_gap = max(longest_gap, now - changed)
            last, changed = current, now


def is_hidden(name: str) -> bool:
    """ROS hides names with a part starting with `_` (an action's `_action/...` topics and services) from listings."""
    return any(part.startswith("_") for part in name.split("/"))


def lookup_type(names_and_types, name: str) -> str | None:
    for found, types in names_and_types:
        if found == name and types:
            return types[0]
    return None


def wait_for_type(node, names_and_types, name: str, timeout: float) -> str | None:
    """The type of `name` among `names_and_types(node)` (a graph query), spinning until it appears or `timeout`
    seconds pass (None then)."""
    wait_for_graph(node, lambda: lookup_type(names_and_types(node), name), timeout)
    return lookup_type(names_and_types(node), name)
