"""Turn a launch file's plain-data node list into a real `launch.LaunchDescription`, and read its arguments.

Our launch files declare `ARGUMENTS` (name → (default, description)) and `node_descriptions(values)` (keyword arguments
of `launch_ros.actions.Node`); on a ROS 2 install their `generate_launch_description()` calls `launch_description`, and
the venv's `ros2` front end runs the same data without launch/launch_ros. Argument values arrive as strings either way;
the helpers here turn them into typed parameter values (or a ValueError saying what is wrong), so both front ends hand
the nodes the same parameters.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
# `ros2 launch --launch-prefix ...` appends these to the launch file's arguments.
ROS2LAUNCH_OPTIONS = ("launch-prefix", "launch-prefix-filter")


def launch_description(arguments: dict[str, tuple[str, str]], node_descriptions: Callable[[dict], list[dict]]):
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    def nodes(context):
        if _named_on_command_line(context):
            # launch itself accepts any name:=value (it becomes an unused configuration): a typo must not pass silently
            given = [item.partition(":=")[0] for item in context.argv if ":=" in item]
            check_names(arguments, [name for name in given if name not in ROS2LAUNCH_OPTIONS])
        values = {name: LaunchConfiguration(name).perform(context) for name in arguments}
        return [Node(output="screen", **_typed(description)) for description in node_descriptions(values)]

    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, (default, text) in arguments.items()]
    return LaunchDescription([*declared, OpaqueFunction(function=nodes)])


def _named_on_command_line(context) -> bool:
    """Whether `ros2 launch` was given this file (its command-line arguments are then this file's own), rather than
    another launch file including it with arguments of its own."""
    path = context.locals.current_launch_file_path if "current_launch_file_path" in context.get_locals_as_dict() else ""
    return bool(path) and os.path.basename(path) in {os.path.basename(item) for item in sys.argv}


def _typed(description: dict) -> dict:
    # launch_ros reads a plain string parameter as YAML ("123" → int, "on" → true); our values are already typed.
    from launch_ros.parameter_descriptions import ParameterValue

    def value(v):
        if isinstance(v, str):
            return ParameterValue(v, value_type=str)
        if isinstance(v, list) and v and all(isinstance(item, str) for item in v):
            return ParameterValue(v, value_type=list[str])
        return v

    parameters = [{k: value(v) for k, v in p.items()} if isinstance(p, dict) else p
                  for p in description.get("parameters", [])]
    return {**description, "parameters": parameters}


def check_names(arguments: dict[str, tuple[str, str]], names: Iterable[str]) -> None:
    """ValueError naming the first of `names` that is not a declared argument, with the declared ones."""
    for name in names:
        if name not in arguments:
            raise ValueError(f"unknown launch argument {name!r}; declared: {', '.join(arguments) or 'none'}")


def argument_values(arguments: dict[str, tuple[str, str]], given: dict[str, str]) -> dict[str, str]:
    """Defaults of `arguments` overridden by the `given` values; ValueError for a name that is not declared."""
    check_names(arguments, given)
    values = {name: default for name, (default, _) in arguments.items()}
    values.update(given)
    return values


def flag(name: str, text: str) -> bool:
    """`text` of launch argument `name` as a boolean (true/false, also 1/0, yes/no, on/off)."""
    if text.strip().lower() in TRUE:
        return True
    if text.strip().lower() in FALSE:
        return False
    raise ValueError(f"launch argument {name}:={text!r} must be true or false")


def number(name: str, text: str, kind: type = float, minimum: float | None = None) -> float | int:
    """`text` of launch argument `name` as a `kind` (int or float) of at least `minimum`."""
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"launch argument {name}:={text!r} must be {'an integer' if kind is int else 'a number'}") \
            from None
    if minimum is not None and value < minimum:
        raise ValueError(f"launch argument {name}:={text!r} must be at least {minimum}")
    return value


def names(name: str, text: str) -> list[str]:
    """Comma-separated `text` of launch argument `name` as a list of non-empty names without spaces."""
    items = [item.strip() for item in text.split(",")]
    if not all(items) or any(" " in item for item in items):
        raise ValueError(f"launch argument {name}:={text!r} must be comma-separated names, e.g. m3-tinyvlm,clip")
    return items


def topic(name: str, text: str) -> str:
    """A topic name given as launch argument `name`; relative names follow the launch namespace."""
    if not text or any(c.isspace() for c in text) or text.endswith("/") or "//" in text:
        raise ValueError(f"launch argument {name}:={text!r} is not a topic name (e.g. camera/color/image_raw; no "
                         "leading slash keeps it inside the namespace)")
    return text


def choice(name: str, text: str, options: Iterable[str]) -> str:
    """`text` of launch argument `name` when it is one of `options`."""
    if text not in options:
        raise ValueError(f"launch argument {name}:={text!r} must be one of {', '.join(options)}")
    return text


def frame(name: str, text: str) -> str:
    """A TF frame id given as launch argument `name`."""
    if text.startswith("/") or any(c.isspace() for c in text):
        raise ValueError(f"launch argument {name}:={text!r} is not a TF frame id (no leading slash, no spaces)")
    return text


def existing_file(name: str, text: str) -> str:
    """Absolute path of the file `text` of launch argument `name` (relative to where the launch runs)."""
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.isfile(path):
        raise ValueError(f"launch argument {name}:={text!r}: no file at {path}")
    return path
