"""Blocking service calls and action goals from short-lived processes (command-line tools, tests)."""
from __future__ import annotations

import contextlib

import rclpy
from rclpy.node import Node

# How long a goal's cancel request may take to be answered (the server replies at once; a loaded machine is slow).
CANCEL_TIMEOUT = 10.0
# action_msgs/msg/GoalStatus codes, as ros2cli prints them.
GOAL_STATUS = {0: "UNKNOWN", 1: "ACCEPTED", 2: "EXECUTING", 3: "CANCELING", 4: "SUCCEEDED", 5: "CANCELED",
               6: "ABORTED"}


@contextlib.contextmanager
def client_node(name: str):
    """An rclpy node for one command. Ctrl-C stays a plain KeyboardInterrupt with the context still up (rclpy's own
    SIGINT handler would shut it down first), so the command can still cancel the goal it sent."""
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = Node(name, start_parameter_services=False)
    try:
        yield node
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def namespaced(namespace: str, name: str) -> str:
    """`/NS/name` (or `/name`); ValueError for a namespace ROS refuses, before any node is made."""
    from rclpy.validate_namespace import validate_namespace

    namespace = "/" + namespace.strip("/") if namespace.strip("/") else ""
    if namespace:
        try:
            validate_namespace(namespace)
        except Exception as exc:   # rclpy's InvalidNamespaceException (not a ValueError) explains the rule broken
            reason = str(exc).splitlines()[0].rstrip(":")   # the rest of rclpy's message points at the character
            raise ValueError(f"namespace {namespace!r} is not a valid ROS namespace: {reason}") from None
    return f"{namespace}/{name}"


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
        return spin_until(node, client.call_async(request), timeout, f"service {name}")
    finally:
        node.destroy_node()


def spin_until(node, future, timeout: float | None, what: str):
    """`future`'s result, spinning `node`; TimeoutError naming `what` after `timeout` s (None: no limit)."""
    rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
    if not future.done():
        raise TimeoutError(f"{what} did not answer within {timeout:.0f} s")
    return future.result()


def send_goal(node, client, name: str, goal, feedback_callback=None, timeout: float = 30.0):
    """Send `goal` through the ActionClient `client` (of action `name`) and return its goal handle (`.accepted` says
    whether the server took it); TimeoutError when no server appears or answers within `timeout` s.

    A Ctrl-C before the server has answered still cancels the goal should it be accepted, then propagates."""
    if not client.wait_for_server(timeout_sec=timeout):
        raise TimeoutError(f"action {name} is not available after {timeout:.0f} s (is its server running, in the same "
                           "ROS_DOMAIN_ID and namespace?)")
    future = client.send_goal_async(goal, feedback_callback=feedback_callback)
    try:
        return spin_until(node, future, timeout, f"action {name}")
    except KeyboardInterrupt:
        rclpy.spin_until_future_complete(node, future, timeout_sec=CANCEL_TIMEOUT)
        if future.done() and future.result().accepted:
            cancel_goal(node, future.result())
        raise


def wait_result(node, handle, timeout: float | None = None):
    """`(status, result)` of an accepted goal once it ends: status as in GOAL_STATUS ("SUCCEEDED", "ABORTED", ...);
    TimeoutError after `timeout` s (None: no limit)."""
    response = spin_until(node, handle.get_result_async(), timeout, "the goal's result")
    return GOAL_STATUS.get(response.status, "UNKNOWN"), response.result


def cancel_goal(node, handle, timeout: float = CANCEL_TIMEOUT) -> bool:
    """Ask the server to cancel the goal of `handle`; whether it agreed within `timeout` s."""
    future = handle.cancel_goal_async()
    rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
    return future.done() and any(g.goal_id == handle.goal_id for g in future.result().goals_canceling)
