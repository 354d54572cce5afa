"""Scan a table, train an M3 memory, answer `/m3/locate`: recorder, trainer and memory server.

A real ROS 2 launch file (`ros2 launch m3_bringup scan_and_grasp.launch.py`). It also describes its nodes as plain data
(`ARGUMENTS`, `node_descriptions()`), which the project venv's `ros2` front end runs where launch/launch_ros are absent.
"""
import os

# name → (default, description); pass as name:=value.
ARGUMENTS = {
    "config_dir": ("", "folder with recorder.yaml, trainer.yaml, memory_server.yaml; empty = m3_bringup's config/"),
    "namespace": ("", "namespace for all nodes (e.g. a robot name); services become /<ns>/m3/..."),
    "log_level": ("info", "log level of every node: debug, info, warn, error"),
}

NODES = (
    ("m3_recorder", "recorder"),
    ("m3_trainer", "trainer"),
    ("m3_memory_server", "memory_server"),
)


def _config_dir(value: str) -> str:
    if value:
        return value
    from ament_index_python.packages import get_package_share_directory

    return os.path.join(get_package_share_directory("m3_bringup"), "config")


def node_descriptions(arguments: dict) -> list:
    """Keyword arguments of `launch_ros.actions.Node` for each node, given launch argument values (strings)."""
    from m3_memory.ros.launch_support import argument_values

    values = argument_values(ARGUMENTS, arguments)
    config_dir = _config_dir(values["config_dir"])
    return [
        {
            "package": "m3_memory",
            "executable": executable,
            "name": name,
            "namespace": values["namespace"],
            "parameters": [os.path.join(config_dir, f"{name}.yaml")],
            "ros_arguments": ["--log-level", values["log_level"]],
        }
        for executable, name in NODES
    ]


def generate_launch_description():
    from m3_memory.ros.launch_support import launch_description

    return launch_description(ARGUMENTS, node_descriptions)
