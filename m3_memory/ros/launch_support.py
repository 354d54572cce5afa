"""Turn a launch file's plain-data node list into a real `launch.LaunchDescription`.

Our launch files declare `ARGUMENTS` (name → (default, description)) and `node_descriptions(values)` (keyword arguments
of `launch_ros.actions.Node`); on a ROS 2 install their `generate_launch_description()` calls this, and the venv's `ros2`
front end runs the same data without launch/launch_ros.
"""
from __future__ import annotations

from collections.abc import Callable


def launch_description(arguments: dict[str, tuple[str, str]], node_descriptions: Callable[[dict], list[dict]]):
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    def nodes(context):
        values = {name: LaunchConfiguration(name).perform(context) for name in arguments}
        return [Node(output="screen", **description) for description in node_descriptions(values)]

    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, (default, text) in arguments.items()]
    return LaunchDescription([*declared, OpaqueFunction(function=nodes)])


def argument_values(arguments: dict[str, tuple[str, str]], given: dict[str, str]) -> dict[str, str]:
    """Defaults of `arguments` overridden by the `given` values."""
    values = {name: default for name, (default, _) in arguments.items()}
    values.update(given)
    return values
