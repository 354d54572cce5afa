"""Training worker node: the `/m3/train` action server (m3_msgs/action/Train).

It checks each goal (the scene directory must be readable here, overrides must be a YAML mapping) and answers bad goals
with a message. The training engine itself belongs to m3_memory.core; until it is present, accepted goals are aborted
with a message that says so.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from m3_msgs.action import Train
from rclpy.action import ActionServer, GoalResponse
from rclpy.node import Node

from m3_memory.ros.spin import spin_node


def goal_problem(goal: Train.Goal) -> str | None:
    """What is wrong with a Train goal, or None."""
    if not goal.scene_dir:
        return "scene_dir is empty: give the directory the recorder wrote"
    if not (Path(goal.scene_dir) / "scene.json").is_file():
        return (f"{goal.scene_dir} is not a scene directory readable on this machine (no scene.json); when the trainer "
                "runs on another machine the scene must be on a shared path")
    if goal.config_overrides:
        try:
            overrides = yaml.safe_load(goal.config_overrides)
        except yaml.YAMLError as exc:
            return f"config_overrides is not valid YAML: {exc}"
        if not isinstance(overrides, dict):
            return "config_overrides must be a YAML mapping, e.g. 'iterations: 500'"
    return None


class Trainer(Node):
    def __init__(self):
        super().__init__("trainer")
        self.server = ActionServer(self, Train, "m3/train", execute_callback=self.execute,
                                   goal_callback=self.on_goal)
        self.get_logger().info("serving the /m3/train action")

    def on_goal(self, goal: Train.Goal) -> GoalResponse:
        problem = goal_problem(goal)
        if problem:
            self.get_logger().warning(f"train goal rejected: {problem}")
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def execute(self, goal_handle) -> Train.Result:
        message = "this build has no training engine yet (m3_memory.core trainer): nothing was trained"
        self.get_logger().error(message)
        goal_handle.abort()
        return Train.Result(success=False, message=message)


def main(args: list[str] | None = None) -> int:
    return spin_node(Trainer, args)
