"""The one way every m3 node process starts, spins and stops."""
from __future__ import annotations

import gc
import signal
import threading
from collections.abc import Callable

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

# How often the main thread comes back from the executor to see whether a stop was requested.
POLL_SECONDS = 0.1


class _Executor(MultiThreadedExecutor):
    def shutdown(self, timeout_sec: float | None = None, *, wait_for_threads: bool = True) -> bool:
        # rclpy's shutdown destroys the executor's guard condition without waiting for callbacks already handed to
        # the thread pool; one that starts afterwards fails on that guard and prints "The following exception was
        # never retrieved: cannot use Destroyable ..." at exit. Let the pool finish its callbacks first.
        self._executor.shutdown(wait=True)
        return super().shutdown(timeout_sec, wait_for_threads=wait_for_threads)


def spin_node(factory: Callable[[], Node], args: list[str] | None = None, threads: int = 2) -> int:
    """Create the node, spin it until SIGINT/SIGTERM, destroy it cleanly. Returns the exit code.

    SIGINT/SIGTERM are handled here in Python, not by rclpy's own handler: the main thread polls a flag between short
    executor waits, so a stop request is honoured even while the process is busy importing torch or loading a memory
    (rclpy's handler was seen to leave a loaded node hanging until SIGKILL).
    """
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node, executor = None, None
    try:
        if stop.is_set():
            return 0
        node = factory()
        executor = _Executor(num_threads=threads)
        executor.add_node(node)
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=POLL_SECONDS)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if executor is not None:
            executor.shutdown(timeout_sec=5.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        # The node is gone; what remains is the interpreter's final collection of torch's and the memory's objects,
        # measured at 6-9 s on a busy 2-core machine (past a launcher's stop grace). Nothing is left to finalise.
        gc.freeze()
    return 0
