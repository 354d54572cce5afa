"""Argument parsing of the venv `ros2` front end; hands over to the real ros2cli when one is installed."""
from __future__ import annotations

import argparse
import os
import sys


def _real_ros2cli():
    try:
        from ros2cli.cli import main as ros2cli_main
    except ImportError:
        return None
    return ros2cli_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ros2", description="ros2 front end of the m3-memory venv (no ROS 2 distro here). "
        "With ROS 2 installed, the real ros2 command is used instead.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    launch = verbs.add_parser("launch", help="start the nodes a launch file describes; Ctrl-C stops them all")
    launch.add_argument("package")
    launch.add_argument("launch_file")
    launch.add_argument("launch_arguments", nargs="*", metavar="name:=value")

    run = verbs.add_parser("run", help="run one executable of a package")
    run.add_argument("package")
    run.add_argument("executable")
    run.add_argument("arguments", nargs=argparse.REMAINDER)

    service = verbs.add_parser("service", help="call and list services").add_subparsers(
        dest="command", metavar="COMMAND", required=True)
    call = service.add_parser("call", help="call a service: NAME [TYPE] [REQUEST as YAML, or a phrase]")
    call.add_argument("service")
    call.add_argument("type", nargs="?", help="e.g. m3_msgs/srv/Locate; looked up on the ROS graph when left out")
    call.add_argument("request", nargs="?", help='YAML like "{query: duck}", or a bare phrase for the first string field')
    call.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the service and its answer")
    call.add_argument("--full", action="store_true", help="print long arrays (image data) in full")
    service_list = service.add_parser("list", help="list services")
    service_list.add_argument("-t", "--show-types", action="store_true")
    service_list.add_argument("--include-hidden-services", action="store_true",
                              help="also the hidden ones (an action's _action/... services)")
    service_type = service.add_parser("type", help="print a service's type")
    service_type.add_argument("service")
    service_type.add_argument("--timeout", type=float, default=5.0)

    topic = verbs.add_parser("topic", help="list and echo topics").add_subparsers(
        dest="command", metavar="COMMAND", required=True)
    topic_list = topic.add_parser("list", help="list topics")
    topic_list.add_argument("-t", "--show-types", action="store_true")
    topic_list.add_argument("--include-hidden-topics", action="store_true",
                            help="also the hidden ones (an action's _action/feedback and _action/status)")
    echo = topic.add_parser("echo", help="print messages of a topic")
    echo.add_argument("topic")
    echo.add_argument("type", nargs="?")
    echo.add_argument("--once", action="store_true", help="print one message and exit")
    echo.add_argument("-n", "--count", type=int, default=None, help="exit after this many messages")
    echo.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the topic to appear")
    echo.add_argument("--full", action="store_true", help="print long arrays in full")

    node = verbs.add_parser("node", help="list nodes").add_subparsers(dest="command", metavar="COMMAND", required=True)
    node_list = node.add_parser("list", help="list running nodes")
    node_list.add_argument("-a", "--all", action="store_true", help="also hidden nodes (names starting with _)")

    action = verbs.add_parser("action", help="send goals to actions, list them").add_subparsers(
        dest="command", metavar="COMMAND", required=True)
    send_goal = action.add_parser("send_goal", help="send a goal: NAME [TYPE] [GOAL as YAML]; Ctrl-C cancels it")
    send_goal.add_argument("action")
    send_goal.add_argument("type", nargs="?", help="e.g. m3_msgs/action/Train; looked up on the ROS graph when left out")
    send_goal.add_argument("goal", nargs="?", help='YAML like "{scene_dir: scans/scan_1}", or a bare phrase for the '
                           "first string field")
    send_goal.add_argument("-f", "--feedback", action="store_true", help="echo the goal's feedback messages")
    send_goal.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the action server")
    send_goal.add_argument("--full", action="store_true", help="print long arrays of the result in full")
    action_list = action.add_parser("list", help="list actions")
    action_list.add_argument("-t", "--show-types", action="store_true")
    info = action.add_parser("info", help="the clients and servers of an action")
    info.add_argument("action")
    info.add_argument("-t", "--show-types", action="store_true")
    info.add_argument("-c", "--count", action="store_true", help="only the numbers of clients and servers")
    return parser


def main(argv: list[str] | None = None) -> int:
    real = _real_ros2cli()
    if real is not None:
        return real(argv=argv) if argv is not None else real()
    args = build_parser().parse_args(argv)
    from m3_memory.venv_ros2 import launcher, verbs

    handlers = {
        ("launch", None): lambda a: launcher.launch(a.package, a.launch_file, a.launch_arguments),
        ("run", None): verbs.run,
        ("service", "call"): verbs.service_call,
        ("service", "list"): verbs.service_list,
        ("service", "type"): verbs.service_type,
        ("topic", "list"): verbs.topic_list,
        ("topic", "echo"): verbs.topic_echo,
        ("node", "list"): verbs.node_list,
        ("action", "send_goal"): verbs.action_send_goal,
        ("action", "list"): verbs.action_list,
        ("action", "info"): verbs.action_info,
    }
    try:
        return handlers[(args.verb, getattr(args, "command", None))](args)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"ros2: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # `ros2 topic echo ... | head`: the reader has gone; stop quietly, as ros2cli does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
