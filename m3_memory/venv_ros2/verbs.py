"""`ros2 service ...`, `ros2 topic ...`, `ros2 node list` and `ros2 run` for the venv front end."""
from __future__ import annotations

import os
import re
import sys

import yaml

from m3_memory.ros.graph_client import call_service
from m3_memory.ros.interfaces import PRINT_MAX_SEQUENCE, fill_message, import_interface, message_to_data
from m3_memory.venv_ros2 import executables
from m3_memory.venv_ros2.graph import cli_node, lookup_type, settle, wait_for_graph

TYPE_NAME = re.compile(r"^[A-Za-z_][\w]*/(msg|srv|action)/[A-Za-z_]\w*$")


def print_yaml(message, full: bool = False) -> None:
    data = message_to_data(message, None if full else PRINT_MAX_SEQUENCE)
    sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    sys.stdout.flush()


def parse_request(text: str | None):
    """YAML mapping → dict; anything else (a bare phrase) stays text and fills the first string field."""
    if text is None or not text.strip():
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return data if isinstance(data, dict) else text


def service_call(args) -> int:
    import rclpy

    type_name, request_text = args.type, args.request
    if type_name is not None and request_text is None and not TYPE_NAME.match(type_name):
        type_name, request_text = None, type_name
    if type_name is None:
        with cli_node() as node:
            wait_for_graph(node, lambda: lookup_type(node.get_service_names_and_types(), args.service), args.timeout)
            type_name = lookup_type(node.get_service_names_and_types(), args.service)
        if type_name is None:
            print(f"service {args.service} not found on the ROS graph within {args.timeout:.0f} s "
                  "(is the server running, in the same ROS_DOMAIN_ID?)", file=sys.stderr)
            return 1
    srv_type = import_interface(type_name)
    try:
        request = fill_message(srv_type.Request(), parse_request(request_text))
    except (ValueError, TypeError, AssertionError) as exc:
        print(f"bad request for {type_name}: {exc}", file=sys.stderr)
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
    with cli_node() as node:
        settle(node)
        own = node.get_fully_qualified_name() + "/"
        for name, types in sorted(node.get_service_names_and_types()):
            if name.startswith(own):
                continue
            print(f"{name} [{', '.join(types)}]" if args.show_types else name)
    return 0


def service_type(args) -> int:
    with cli_node() as node:
        wait_for_graph(node, lambda: lookup_type(node.get_service_names_and_types(), args.service), args.timeout)
        found = lookup_type(node.get_service_names_and_types(), args.service)
    if found is None:
        print(f"service {args.service} not found", file=sys.stderr)
        return 1
    print(found)
    return 0


def topic_list(args) -> int:
    with cli_node() as node:
        settle(node)
        for name, types in sorted(node.get_topic_names_and_types()):
            print(f"{name} [{', '.join(types)}]" if args.show_types else name)
    return 0


def topic_echo(args) -> int:
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    import rclpy

    with cli_node() as node:
        type_name = args.type
        if type_name is None:
            wait_for_graph(node, lambda: lookup_type(node.get_topic_names_and_types(), args.topic), args.timeout)
            type_name = lookup_type(node.get_topic_names_and_types(), args.topic)
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
    with cli_node() as node:
        settle(node)
        own = node.get_fully_qualified_name()
        for name, namespace in sorted(node.get_node_names_and_namespaces()):
            full = f"{namespace.rstrip('/')}/{name}"
            if full != own:
                print(full)
    return 0


def run(args) -> int:
    path = executables.find(args.package, args.executable)
    os.execv(path, [path, *args.arguments])
