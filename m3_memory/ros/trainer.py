"""Training worker node: the `/m3/train` action server (m3_msgs/action/Train).

A goal names a scene directory (readable on this machine: a trainer on another computer of the same ROS domain needs
the scans on a shared path) and YAML overrides of config/train.yaml. The node extracts the features (cached in the
scene), trains with m3_memory.core.trainer on CUDA when present (CPU otherwise), sends feedback every `log_every`
iterations, honours cancel, writes the checkpoint atomically and announces it on `m3/checkpoint` (latched), which the
memory server loads.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import yaml
from m3_msgs.action import Train
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from std_msgs.msg import String

from m3_memory.core.cli import DEFAULT_TRAIN_CONFIG, load_train_config, scene_features
from m3_memory.core.errors import M3Error
from m3_memory.core.scene import Scene
from m3_memory.core.trainer import TrainingCancelled, train
from m3_memory.ros.qos import LATCHED
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
        self.config_path = Path(self.declare_parameter("train_config", str(DEFAULT_TRAIN_CONFIG)).value)
        self.models = list(self.declare_parameter("models", ["m3-tinyvlm"]).value)
        self.busy = threading.Lock()  # one training at a time: a second goal is rejected while one runs
        self.checkpoint_pub = self.create_publisher(String, "m3/checkpoint", LATCHED)
        self.server = ActionServer(self, Train, "m3/train", execute_callback=self.execute, goal_callback=self.on_goal,
                                   cancel_callback=lambda _: CancelResponse.ACCEPT,
                                   callback_group=ReentrantCallbackGroup())
        self.get_logger().info(f"serving the /m3/train action (models {self.models}, config {self.config_path})")

    def on_goal(self, goal: Train.Goal) -> GoalResponse:
        problem = goal_problem(goal) or ("a training is already running" if self.busy.locked() else None)
        if problem:
            self.get_logger().warning(f"train goal rejected: {problem}")
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def execute(self, goal_handle) -> Train.Result:
        goal = goal_handle.request
        with self.busy:
            try:
                return self._train(goal_handle, goal)
            except TrainingCancelled as exc:
                goal_handle.canceled()
                self.get_logger().info(str(exc))
                return Train.Result(success=False, message=f"{exc}; the previous memory stays in service")
            except (M3Error, ValueError, OSError) as exc:
                goal_handle.abort()
                self.get_logger().error(f"training failed: {exc}")
                return Train.Result(success=False, message=f"training failed: {exc}")

    def _train(self, goal_handle, goal: Train.Goal) -> Train.Result:
        overrides = yaml.safe_load(goal.config_overrides) if goal.config_overrides else {}
        config = load_train_config(self.config_path, overrides)
        scene = Scene.load(goal.scene_dir)
        output = Path(goal.output) if goal.output else Path(goal.scene_dir) / "memory.pt"
        self.get_logger().info(f"training {len(scene)} views of {goal.scene_dir} for {config.iterations} iterations "
                               f"→ {output}")
        started = time.monotonic()
        features = scene_features(scene, Path(goal.scene_dir), self.models, progress=False)

        def feedback(progress):
            goal_handle.publish_feedback(Train.Feedback(
                iteration=progress.iteration, total_iterations=progress.total, loss=progress.loss,
                rgb_loss=progress.rgb_loss, feature_loss=progress.feature_loss,
                elapsed_seconds=progress.elapsed_s, eta_seconds=progress.eta_s))

        memory = train(scene, features, config, output, callback=feedback,
                       should_cancel=lambda: goal_handle.is_cancel_requested)
        goal_handle.succeed()
        self.checkpoint_pub.publish(String(data=str(output)))
        final = memory.config["final"]
        self.get_logger().info(f"memory written to {output} ({len(memory.gaussians)} Gaussians)")
        return Train.Result(success=True, message="trained", checkpoint=str(output), iterations=config.iterations,
                            final_loss=final["loss"], psnr=final["psnr"], num_gaussians=len(memory.gaussians),
                            train_seconds=time.monotonic() - started)


def main(args: list[str] | None = None) -> int:
    return spin_node(Trainer, args, threads=4)
