"""The one way every m3 node process starts, spins and stops."""
from __future__ import annotations

from collections.abc import Callable

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node


def spin_node(factory: Callable[[], Node], args: list[str] | None = None, threads: int = 2) -> int:
    """Create the node, spin it until SIGINT/SIGTERM or shutdown, destroy it cleanly. Returns the exit code."""
    rclpy.init(args=args)
    node = None
    try:
        node = factory()
        executor = MultiThreadedExecutor(num_threads=threads)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
