"""`m3 play BAG`: replay a rosbag2 bag into the live ROS graph (no rosbag2 in the venv), like `ros2 bag play`.

Messages are published as the bag's raw CDR bytes, in bag order and at the bag's pace times `--rate`; each topic gets
the QoS the recorder offered (so `/tf_static` stays latched for late subscribers), or the reliability `--qos-reliability`
names. `--namespace robot1` puts the bag's topics under /robot1 (bags keep the absolute names they were recorded with;
/tf, /tf_static and /clock stay global, as in ROS). `--clock` publishes /clock (rosgraph_msgs/Clock) from the bag's
time while playing, for nodes run with use_sim_time:=true.
"""
from __future__ import annotations

import time
from pathlib import Path

GLOBAL_TOPICS = ("/tf", "/tf_static", "/clock")  # never moved under a namespace (ROS convention)


def register(verbs) -> None:
    parser = verbs.add_parser("play", help="replay a rosbag2 bag (MCAP or sqlite3) into the running ROS graph")
    parser.add_argument("bag", help="bag directory")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (2 = twice as fast)")
    parser.add_argument("--topics", nargs="*", default=None, help="only these topics (as named in the bag)")
    parser.add_argument("--wait-for", default=None, metavar="TOPIC",
                        help="start only once TOPIC (as published, namespace included) has a matching subscriber "
                             "(e.g. the recorder's colour topic)")
    parser.add_argument("--namespace", default="", metavar="NS",
                        help="publish the bag's topics under /NS (e.g. robot1); /tf, /tf_static stay global")
    parser.add_argument("--clock", nargs="?", type=float, const=40.0, default=None, metavar="HZ",
                        help="publish /clock from the bag's time (at HZ between messages, default 40), as "
                             "`ros2 bag play --clock`")
    parser.add_argument("--qos-reliability", choices=("reliable", "best_effort"), default=None,
                        help="publish every topic but /tf_static with this reliability instead of the recorded one "
                             "(best_effort: as a camera driver with sensor-data QoS)")
    parser.set_defaults(func=run)


def namespaced(topic: str, namespace: str) -> str:
    """`topic` (absolute, as in a bag) under `/namespace`, unless it is one of GLOBAL_TOPICS."""
    namespace = namespace.strip("/")
    if not namespace or topic in GLOBAL_TOPICS:
        return topic
    return f"/{namespace}/{topic.lstrip('/')}"


def _qos_of(connection, reliability: str | None):
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    qos = QoSProfile(depth=100)
    for offered in getattr(connection.ext, "offered_qos_profiles", []):
        if offered.durability.name == "TRANSIENT_LOCAL":
            qos.durability = DurabilityPolicy.TRANSIENT_LOCAL
        if offered.reliability.name == "BEST_EFFORT":
            qos.reliability = ReliabilityPolicy.BEST_EFFORT
    if reliability is not None and connection.topic != "/tf_static":  # latched static TF must stay reliable
        qos.reliability = ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort" else ReliabilityPolicy.RELIABLE
    return qos


def play(bag: str, rate: float = 1.0, topics: list[str] | None = None, wait_for: str | None = None,
         namespace: str = "", clock_hz: float | None = None, reliability: str | None = None, log=print) -> int:
    """Publish the bag's messages; returns how many were published. FileNotFoundError for a missing bag."""
    import rclpy
    from rosbags.rosbag2 import Reader

    from m3_memory.ros.interfaces import import_interface

    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if clock_hz is not None and clock_hz <= 0:
        raise ValueError(f"--clock rate must be > 0 Hz, got {clock_hz}")
    if not (Path(bag) / "metadata.yaml").is_file():
        raise FileNotFoundError(f"no rosbag2 bag at {bag} (a bag is a folder with metadata.yaml)")
    owns_context = not rclpy.ok()
    if owns_context:
        rclpy.init()
    node = rclpy.create_node("m3_bag_player", start_parameter_services=False)
    published = 0
    try:
        with Reader(bag) as reader:
            connections = [c for c in reader.connections if topics is None or c.topic in topics]
            publishers = {c.id: node.create_publisher(import_interface(c.msgtype), namespaced(c.topic, namespace),
                                                      _qos_of(c, reliability))
                          for c in connections}
            clock = _BagClock(node, clock_hz) if clock_hz is not None else None
            if wait_for is not None:
                log(f"waiting for a subscriber on {wait_for}")
                _wait_for_subscriber(node, publishers.values(), wait_for)
            time.sleep(0.5)  # let DDS match the new publishers with their subscribers
            log(f"playing {bag}: {reader.message_count} messages over {reader.duration * 1e-9:.1f} s at rate {rate}")
            start_wall, start_bag = time.monotonic(), None
            for connection, bag_ns, raw in reader.messages(connections=connections):
                start_bag = bag_ns if start_bag is None else start_bag
                due = start_wall + (bag_ns - start_bag) * 1e-9 / rate
                if clock is None:
                    time.sleep(max(0.0, due - time.monotonic()))
                else:
                    clock.wait_until(due, bag_ns, rate)
                publishers[connection.id].publish(bytes(raw))
                published += 1
        time.sleep(0.2)  # let the last messages leave before the publishers are destroyed
        log(f"published {published} messages")
        return published
    finally:
        node.destroy_node()
        if owns_context:
            rclpy.try_shutdown()


def _wait_for_subscriber(node, publishers, topic: str) -> None:
    """Until `topic` has a subscriber; for a topic this player publishes, one whose QoS matches (a reliable
    subscriber does not match a best-effort publisher, and would get nothing)."""
    resolved = node.resolve_topic_name(topic)
    own = [p for p in publishers if p.topic_name == resolved]
    while not (any(p.get_subscription_count() for p in own) if own else node.count_subscribers(resolved)):
        time.sleep(0.05)


class _BagClock:
    """Publishes the bag's time on /clock at `hz` (wall time) while the player waits between messages."""

    def __init__(self, node, hz: float):
        from rclpy.qos import QoSProfile
        from rosgraph_msgs.msg import Clock

        self.Clock, self.period, self.last = Clock, 1.0 / hz, float("-inf")
        # reliable: matches rclpy's best-effort /clock subscription and reliable ones alike
        self.publisher = node.create_publisher(Clock, "/clock", QoSProfile(depth=1))

    def send(self, bag_ns: int) -> None:
        msg = self.Clock()
        msg.clock.sec, msg.clock.nanosec = divmod(int(bag_ns), 10**9)
        self.publisher.publish(msg)
        self.last = time.monotonic()

    def wait_until(self, due: float, bag_ns: int, rate: float) -> None:
        """Sleep until monotonic time `due` (when the message of bag time `bag_ns` is due), ticking the clock."""
        while (now := time.monotonic()) < due:
            if now - self.last >= self.period:
                self.send(bag_ns - int((due - now) * rate * 1e9))
            time.sleep(min(due - now, self.period))
        if time.monotonic() - self.last >= self.period:
            self.send(bag_ns)


def run(args) -> int:
    from rosbags.rosbag2 import ReaderError

    try:
        play(args.bag, args.rate, args.topics, args.wait_for, args.namespace, args.clock, args.qos_reliability)
    except ReaderError as exc:
        raise ValueError(f"cannot read the bag {args.bag}: {exc}") from None
    return 0
