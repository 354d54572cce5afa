"""`m3 play BAG`: replay a rosbag2 bag into the live ROS graph (no rosbag2 in the venv).

Messages are published as the bag's raw CDR bytes, in bag order and at the bag's pace times `--rate`; each topic gets
the QoS the recorder offered (so `/tf_static` stays latched for late subscribers).
"""
from __future__ import annotations

import sys
import time


def register(verbs) -> None:
    parser = verbs.add_parser("play", help="replay a rosbag2 bag (MCAP or sqlite3) into the running ROS graph")
    parser.add_argument("bag", help="bag directory")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (2 = twice as fast)")
    parser.add_argument("--topics", nargs="*", default=None, help="only these topics")
    parser.add_argument("--wait-for", default=None, metavar="TOPIC",
                        help="start only once TOPIC has a subscriber (e.g. the recorder's colour topic)")
    parser.set_defaults(func=run)


def _qos_of(connection):
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    qos = QoSProfile(depth=100)
    for offered in getattr(connection.ext, "offered_qos_profiles", []):
        if offered.durability.name == "TRANSIENT_LOCAL":
            qos.durability = DurabilityPolicy.TRANSIENT_LOCAL
        if offered.reliability.name == "BEST_EFFORT":
            qos.reliability = ReliabilityPolicy.BEST_EFFORT
    return qos


def play(bag: str, rate: float = 1.0, topics: list[str] | None = None, wait_for: str | None = None,
         log=print) -> int:
    """Publish the bag's messages; returns how many were published."""
    import rclpy
    from rosbags.rosbag2 import Reader

    from m3_memory.ros.interfaces import import_interface

    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    owns_context = not rclpy.ok()
    if owns_context:
        rclpy.init()
    node = rclpy.create_node("m3_bag_player", start_parameter_services=False)
    published = 0
    try:
        with Reader(bag) as reader:
            connections = [c for c in reader.connections if topics is None or c.topic in topics]
            publishers = {c.id: node.create_publisher(import_interface(c.msgtype), c.topic, _qos_of(c))
                          for c in connections}
            if wait_for is not None:
                log(f"waiting for a subscriber on {wait_for}")
                while node.count_subscribers(wait_for) == 0:
                    time.sleep(0.05)
            time.sleep(0.5)  # let DDS match the new publishers with their subscribers
            log(f"playing {bag}: {reader.message_count} messages over {reader.duration * 1e-9:.1f} s at rate {rate}")
            start_wall, start_bag = time.monotonic(), None
            for connection, bag_ns, raw in reader.messages(connections=connections):
                start_bag = bag_ns if start_bag is None else start_bag
                delay = (bag_ns - start_bag) * 1e-9 / rate - (time.monotonic() - start_wall)
                if delay > 0:
                    time.sleep(delay)
                publishers[connection.id].publish(bytes(raw))
                published += 1
        time.sleep(0.2)  # let the last messages leave before the publishers are destroyed
        log(f"published {published} messages")
        return published
    finally:
        node.destroy_node()
        if owns_context:
            rclpy.try_shutdown()


def run(args) -> int:
    from rosbags.rosbag2 import ReaderError

    try:
        play(args.bag, args.rate, args.topics, args.wait_for)
    except (ReaderError, ValueError, ImportError) as exc:
        print(f"m3 play: cannot play {args.bag}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
