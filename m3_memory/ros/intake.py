"""Stream intake on a thread of its own: subscriptions that must keep up with their publishers (50 Hz /tf, 15-30 Hz
camera streams) whatever the node's other callbacks do.

rclpy's executors take one message per subscription per wake-up and rebuild their wait set in Python each time; in a
node that also runs timers, services and frame decisions, under GIL contention, that was measured to serve a 50 Hz
/tf at about half its rate: TF callbacks ran 2 s behind, the 100-deep history overflowed (lost samples, `gap`) and
frames gave up waiting (`stale`). Here the subscriptions live on a helper node spun by a single-threaded executor on a
dedicated thread (what tf2_ros's listener does with its own thread), so each message costs one short wake-up.

The helper node ignores the process's ROS arguments (a launch's `__node:=` rename would give two nodes one name):
topics are resolved through the owning node instead (`Node.resolve_topic_name`: its namespace and remappings).
"""
from __future__ import annotations

import threading

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy


class IntakeThread:
    """A helper node `<owner>_intake` in `owner`'s namespace with its own executor thread; `subscribe` like
    `Node.create_subscription`, `stop` ends the thread and destroys the node."""

    def __init__(self, owner: Node):
        self.owner = owner
        self.node = rclpy.create_node(f"{owner.get_name()}_intake", namespace=owner.get_namespace(),
                                      use_global_arguments=False, start_parameter_services=False,
                                      context=owner.context)
        self.executor = SingleThreadedExecutor(context=owner.context)
        self.executor.add_node(self.node)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name=f"{owner.get_name()}-intake", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            while not self._stop.is_set() and self.owner.context.ok():
                self.executor.spin_once(timeout_sec=0.1)
        except (ExternalShutdownException, KeyboardInterrupt):
            pass

    def subscribe(self, msg_type, topic: str, callback, qos: QoSProfile):
        """`topic` as the owner names it (relative names in its namespace, its remappings applied)."""
        return self.node.create_subscription(msg_type, self.owner.resolve_topic_name(topic), callback, qos)

    def unsubscribe(self, subscription) -> None:
        self.node.destroy_subscription(subscription)

    def stop(self) -> None:
        self._stop.set()
        self.executor.wake()
        self._thread.join(timeout=5.0)
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()


def offered_reliability(node: Node, topic: str) -> ReliabilityPolicy | None:
    """What the publishers of the resolved `topic` offer, as rosbag2's recorder adapts to it: BEST_EFFORT when any
    publisher is best effort (a reliable subscription would not match it), RELIABLE when all are reliable, None when
    there is no publisher yet."""
    offered = [info.qos_profile.reliability for info in node.get_publishers_info_by_topic(topic)]
    if not offered:
        return None
    return ReliabilityPolicy.BEST_EFFORT if ReliabilityPolicy.BEST_EFFORT in offered else ReliabilityPolicy.RELIABLE
