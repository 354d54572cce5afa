"""`ros2 service ...`, `ros2 topic ...`, `ros2 action ...`, `ros2 node list` and `ros2 run` for the venv front end."""
from __future__ import annotations

import os
import re
import sys

import yaml

from m3_memory.ros.graph_client import call_service, cancel_goal, client_node, send_goal, wait_result
from m3_memory.ros.interfaces import PRINT_MAX_SEQUENCE, fill_message, import_interface, message_to_data
from m3_memory.venv_ros2 import executables
from m3_memory.venv_ros2.graph import is_hidden, settle, wait_for_type

TYPE_NAME = re.compile(r"^[A-Za-z_][\w]*/(msg|srv|action)/[A-Za-z_]\w*$")
CLI_NODE = "m3_ros2_cli"


def to_yaml(message, full: bool = False) -> str:
    data = message_to_data(message, None if full else PRINT_MAX_SEQUENCE)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def print_yaml(message, full: bool = False) -> None:
    sys.stdout.write(to_yaml(message, full))
    sys.stdout.flush()


def split_type(type_name: str | None, text: str | None) -> tuple[str | None, str | None]:
    """`NAME [TYPE] [REQUEST]`: a lone second argument that is not a type name is the request."""
    if type_name is not None and text is None and not TYPE_NAME.match(type_name):
        return None, type_name
    return type_name, text


def parse_request(text: str | None):
    """YAML mapping → dict; anything else (a bare phrase) stays text and fills the first string field."""
    if text is None or not text.strip():
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return data if isinstance(data, dict) else text


def filled(message, text: str | None, what: str, type_name: str):
    """`message` (a request or goal, `what`) filled from `text` (see parse_request); None when `text` does not fit
    `type_name`, after saying why on stderr: the verb then exits 2."""
    try:
        return fill_message(message, parse_request(text))
    except (ValueError, TypeError, AssertionError) as exc:
        print(f"bad {what} for {type_name}: {exc}", file=sys.stderr)
        return None


def service_call(args) -> int:
    import rclpy

    type_name, request_text = split_type(args.type, args.request)
    if type_name is None:
        with client_node(CLI_NODE) as node:
            type_name = wait_for_type(node, lambda n: n.get_service_names_and_types(), args.service, args.timeout)
        if type_name is None:
            print(f"service {args.service} not found on the ROS graph within {args.timeout:.0f} s "
                  "(is the server running, in the same ROS_DOMAIN_ID?)", file=sys.stderr)
            return 1
    srv_type = import_interface(type_name)
    request = filled(srv_type.Request(), request_text, "request", type_name)
    if request is None:
        return 2
    print("requester: making request:")
    print_yaml(request)
    try:
        response = call_service(srv_type, args.service, request, args.timeout, node_name="m3_ros2_cli")
    except TimeoutError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        rclpy.try_shutdown()
    print("\nresponse:")
    print_yaml(response, full=args.full)
    return 0


def service_list(args) -> int:
    with client_node(CLI_NODE) as node:
        settle(node)
        own = node.get_fully_qualified_name() + "/"
        for name, types in sorted(node.get_service_names_and_types()):
            if name.startswith(own) or (is_hidden(name) and not args.include_hidden_services):
                continue
            print(f"{name} [{', '.join(types)}]" if args.show_types else name)
    return 0


def service_type(args) -> int:
    with client_node(CLI_NODE) as node:
        found = wait_for_type(node, lambda n: n.get_service_names_and_types(), args.service, args.timeout)
    if found is None:
        print(f"service {args.service} not found", file=sys.stderr)
        return 1
    print(found)
    return 0


def topic_list(args) -> int:
    with client_node(CLI_NODE) as node:
        settle(node)
        for name, types in sorted(node.get_topic_names_and_types()):
            if is_hidden(name) and not args.include_hidden_topics:
                continue
            print(f"{name} [{', '.join(types)}]" if args.show_types else name)
    return 0


def topic_echo(args) -> int:
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    import rclpy

    with client_node(CLI_NODE) as node:
        type_name = args.type
        if type_name is None:
            type_name = wait_for_type(node, lambda n: n.get_topic_names_and_types(), args.topic, args.timeout)
            if type_name is None:
                print(f"topic {args.topic} not found; give its type as the second argument", file=sys.stderr)
                return 1
        # Match the publishers' QoS so latched (transient local) and best-effort topics are received.
        publishers = node.get_publishers_info_by_topic(args.topic)
        qos = QoSProfile(depth=10)
        if publishers and all(p.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for p in publishers):
            qos.durability = DurabilityPolicy.TRANSIENT_LOCAL
        if any(p.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT for p in publishers):
            qos.reliability = ReliabilityPolicy.BEST_EFFORT
        received = []

        def on_message(message):
            received.append(1)
            print_yaml(message, full=args.full)
            print("---", flush=True)

        node.create_subscription(import_interface(type_name), args.topic, on_message, qos)
        limit = 1 if args.once else args.count
        try:
            while limit is None or len(received) < limit:
                rclpy.spin_once(node, timeout_sec=0.1)
        except KeyboardInterrupt:
            pass
    return 0


def node_list(args) -> int:
    with client_node(CLI_NODE) as node:
        settle(node)
        own = node.get_fully_qualified_name()
        for name, namespace in sorted(node.get_node_names_and_namespaces()):
            full = f"{namespace.rstrip('/')}/{name}"
            if full != own and (args.all or not is_hidden(full)):
                print(full)
    return 0


def action_list(args) -> int:
    from rclpy.action import get_action_names_and_types

    with client_node(CLI_NODE) as node:
        settle(node)
        for name, types in sorted(get_action_names_and_types(node)):
            print(f"{name} [{', '.join(types)}]" if args.show_types else name)
    return 0


def action_info(args) -> int:
    from rclpy.action.graph import get_action_client_names_and_types_by_node, get_action_server_names_and_types_by_node

    action = "/" + args.action.lstrip("/")
    with client_node(CLI_NODE) as node:
        settle(node)
        ends = {"clients": [], "servers": []}
        for name, namespace in sorted(node.get_node_names_and_namespaces()):
            for kind, by_node in (("clients", get_action_client_names_and_types_by_node),
                                  ("servers", get_action_server_names_and_types_by_node)):
                ends[kind] += [(f"{namespace.rstrip('/')}/{name}", types) for found, types in by_node(node, name, namespace)
                               if found == action]
    print(f"Action: {action}")
    for kind in ("clients", "servers"):
        print(f"Action {kind}: {len(ends[kind])}")
        for name, types in [] if args.count else ends[kind]:
            print(f"    {name} [{', '.join(types)}]" if args.show_types else f"    {name}")
    return 0


def action_send_goal(args) -> int:
    """ros2cli's `ros2 action send_goal`, same output; Ctrl-C cancels the goal. Exits 0 once the goal has finished,
    whatever its status (as ros2cli does): the last line says which."""
    from rclpy.action import ActionClient, get_action_names_and_types

    type_name, goal_text = split_type(args.type, args.goal)
    action = "/" + args.action.lstrip("/")
    with client_node(CLI_NODE) as node:
        if type_name is None:
            type_name = wait_for_type(node, get_action_names_and_types, action, args.timeout)
            if type_name is None:
                print(f"action {action} not found on the ROS graph within {args.timeout:.0f} s; give its type "
                      "(e.g. m3_msgs/action/Train) as the second argument", file=sys.stderr)
                return 1
        action_type = import_interface(type_name)
        goal = filled(action_type.Goal(), goal_text, "goal", type_name)
        if goal is None:
            return 2

        def on_feedback(message):
            print(f"Feedback:\n    {to_yaml(message.feedback)}", flush=True)

        client = ActionClient(node, action_type, action)
        handle = None
        try:
            print("Waiting for an action server to become available...", flush=True)
            if client.wait_for_server(timeout_sec=args.timeout):
                print(f"Sending goal:\n     {to_yaml(goal)}", flush=True)
            handle = send_goal(node, client, action, goal, on_feedback if args.feedback else None, args.timeout)
            if not handle.accepted:
                print("Goal was rejected.")
                return 0
            print(f"Goal accepted with ID: {bytes(handle.goal_id.uuid).hex()}\n", flush=True)
            status, result = wait_result(node, handle)
        except TimeoutError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            if handle is not None and handle.accepted:
                print("Canceling goal...", flush=True)
                print("Goal canceled." if cancel_goal(node, handle) else "Failed to cancel goal", flush=True)
            return 130
        finally:
            client.destroy()
    print(f"Result:\n    {to_yaml(result, full=args.full)}")
    print(f"Goal finished with status: {status}")
    return 0


def run(args) -> int:
    path = executables.find(args.package, args.executable)
    os.execv(path, [path, *args.arguments])
