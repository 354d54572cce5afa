"""Training worker node: the `/m3/train` action server (m3_msgs/action/Train).

A goal names a scene directory (readable on this machine: a trainer on another computer of the same ROS domain needs
the scans on a shared path) and YAML overrides of config/train.yaml. The node extracts the features (cached in the
scene), trains with m3_memory.core.trainer on CUDA when present (CPU otherwise), sends feedback every `log_every`
iterations, honours cancel, writes the checkpoint atomically and announces its resolved path on `m3/checkpoint`
(latched), which the memory server loads.

Paths are confined to the node's roots (parameters, relative to the node's working directory): `scene_dir` must resolve,
symlinks included, under one of `scene_roots` (training writes `features/` into it); `output` is taken relative to
`output_root` (empty = `<output_root>/<scene folder name>.pt`) and must resolve under it. An existing file there is
replaced only when it is a memory.

Refusals: every goal is accepted, then checked before anything is written; a goal that cannot run (no scene, a path
outside the roots, invalid YAML, an unknown or mistyped setting, an iteration count below 1, a device this machine
lacks, another training running) ends ABORTED with `result.success = false` and `result.message` saying why. That is
the ROS 2 convention for reasons (an action's goal response carries no text), so a client reads the reason from the
result, not from this node's log. Nothing is written or announced for an aborted goal.
"""
from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml
from m3_msgs.action import Train
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from std_msgs.msg import String

from m3_memory.core.atomic import remove_stale_temps
from m3_memory.core.checkpoint import memory_format
from m3_memory.core.errors import M3Error
from m3_memory.core.paths import confine
from m3_memory.core.pipeline import DEFAULT_TRAIN_CONFIG, load_train_config, scene_features
from m3_memory.core.scene import Scene
from m3_memory.core.trainer import TrainConfig, TrainingCancelled, train
from m3_memory.ros.qos import LATCHED
from m3_memory.ros.spin import spin_node


@dataclass
class TrainJob:
    """A goal checked and resolved: where to read, where to write, with which settings."""
    scene_dir: Path
    output: Path
    config: TrainConfig


def plan_goal(goal: Train.Goal, scene_roots: list[Path], output_root: Path, config_path: Path) -> TrainJob:
    """The job a Train goal asks for, or M3Error / ValueError saying why it cannot run. Reads files only."""
    if not goal.scene_dir:
        raise M3Error("scene_dir is empty: give the directory the recorder wrote")
    scene_dir = confine(goal.scene_dir, scene_roots, "scene_dir")
    if not (scene_dir / "scene.json").is_file():
        raise M3Error(f"{goal.scene_dir} is not a scene directory readable on this machine (no scene.json); when the "
                      "trainer runs on another machine the scene must be on a shared path")
    overrides = {}
    if goal.config_overrides:
        try:
            overrides = yaml.safe_load(goal.config_overrides)
        except yaml.YAMLError as exc:
            raise M3Error(f"config_overrides is not valid YAML: {exc}") from exc
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, dict):
            raise M3Error("config_overrides must be a YAML mapping, e.g. 'iterations: 500'")
    config = load_train_config(config_path, overrides)   # type-checked, iterations >= 1, the device exists
    output = confine(output_root / (goal.output or f"{scene_dir.name}.pt"), [output_root], "output")
    if output == output_root or output.is_dir():
        raise M3Error(f"output {goal.output or output} is a folder: name the memory file to write")
    if output.exists() and memory_format(output) is None:
        raise M3Error(f"output {output} exists and is not a memory: it is never overwritten; choose another name")
    return TrainJob(scene_dir, output, config)


class Trainer(Node):
    def __init__(self):
        super().__init__("trainer")
        self.config_path = Path(self.declare_parameter("train_config", str(DEFAULT_TRAIN_CONFIG)).value)
        self.models = list(self.declare_parameter("models", ["m3-tinyvlm"]).value)
        roots = self.declare_parameter("scene_roots", ["scans"]).value
        self.scene_roots = [Path(p).expanduser().resolve() for p in roots]
        self.output_root = Path(self.declare_parameter("output_root", "memories").value).expanduser().resolve()
        for path in remove_stale_temps(self.output_root, recursive=True):   # a save killed mid-write
            self.get_logger().info(f"removed {path}, left by an interrupted checkpoint save")
        self.busy = threading.Lock()  # one training at a time: a goal arriving during one is aborted with the reason
        self.checkpoint_pub = self.create_publisher(String, "m3/checkpoint", LATCHED)
        self.server = ActionServer(self, Train, "m3/train", execute_callback=self.execute,
                                   goal_callback=lambda _: GoalResponse.ACCEPT,
                                   cancel_callback=lambda _: CancelResponse.ACCEPT,
                                   callback_group=ReentrantCallbackGroup())
        self.get_logger().info(f"serving the /m3/train action (models {self.models}, config {self.config_path}); "
                               f"scenes under {[str(p) for p in self.scene_roots]}, memories to {self.output_root}")

    def execute(self, goal_handle) -> Train.Result:
        if not self.busy.acquire(blocking=False):
            return self._abort(goal_handle, "a training is already running (one at a time): send the goal again when "
                                            "it ends")
        try:
            try:
                job = plan_goal(goal_handle.request, self.scene_roots, self.output_root, self.config_path)
            except (M3Error, ValueError, OSError) as exc:
                return self._abort(goal_handle, f"goal refused: {exc}")
            return self._train(goal_handle, job)
        except TrainingCancelled as exc:
            goal_handle.canceled()
            self.get_logger().info(str(exc))
            return Train.Result(success=False, message=f"{exc}; the previous memory stays in service")
        except (M3Error, ValueError, OSError) as exc:
            return self._abort(goal_handle, f"training failed: {exc}")
        except Exception as exc:  # a bug: the client still learns what happened, the log gets the traceback
            self.get_logger().error(traceback.format_exc())
            return self._abort(goal_handle, f"training failed: {type(exc).__name__}: {exc}")
        finally:
            self.busy.release()

    def _abort(self, goal_handle, message: str) -> Train.Result:
        goal_handle.abort()
        self.get_logger().warning(message)
        return Train.Result(success=False, message=message)

    def _train(self, goal_handle, job: TrainJob) -> Train.Result:
        scene = Scene.load(job.scene_dir)
        self.get_logger().info(f"training {len(scene)} views of {job.scene_dir} for {job.config.iterations} "
                               f"iterations → {job.output}")
        started = time.monotonic()
        features = scene_features(scene, job.scene_dir, self.models)

        def feedback(progress):
            goal_handle.publish_feedback(Train.Feedback(
                iteration=progress.iteration, total_iterations=progress.total, loss=progress.loss,
                rgb_loss=progress.rgb_loss, feature_loss=progress.feature_loss,
                elapsed_seconds=progress.elapsed_s, eta_seconds=progress.eta_s))

        memory = train(scene, features, job.config, job.output, callback=feedback,
                       should_cancel=lambda: goal_handle.is_cancel_requested)
        final = memory.config["final"]
        goal_handle.succeed()
        self.checkpoint_pub.publish(String(data=str(job.output)))
        self.get_logger().info(f"memory written to {job.output} ({len(memory.gaussians)} Gaussians)")
        return Train.Result(success=True, message="trained", checkpoint=str(job.output),
                            iterations=job.config.iterations, final_loss=final["loss"], psnr=final["psnr"],
                            num_gaussians=len(memory.gaussians), train_seconds=time.monotonic() - started)


def main(args: list[str] | None = None) -> int:
    return spin_node(Trainer, args, threads=4)
