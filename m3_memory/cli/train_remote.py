"""`m3 train-remote`: have the running trainer node train a memory (a goal of its `/m3/train` action), with a progress
bar fed by the goal's feedback; Ctrl-C cancels the goal.

What to train, one of:
- nothing: the scan the recorder of the same namespace finished last (its latched `m3/recorder/status`);
- `--scan ID [--robot NAME]`: a scan as a recorder reports it (its id, or its whole `scene_dir`); the trainer fetches it
  from `/NAME/m3/recorder` when it is not on the trainer's disk (`--robot` left out: the trainer's namespace);
- `SCENE`: a scene directory on the trainer's disk (under its `scene_roots`; relative paths are the trainer's).
`--set` overrides training settings as `m3 train` does (`--set update.iterations=200`: an update's, see
m3_memory.core.online.UpdateConfig); the trainer checks them and says why a goal cannot run.

`--live` trains while the scan still records (the trainer's live mode): left without a scan it takes the one the recorder
is recording now; the progress shows each memory the trainer publishes (views, Gaussians, bank sizes) and its age, and
the goal ends after the final refinement that follows the recorder's stop. `--base-memory ID|PATH` updates that memory
(a memory id of the robot on the trainer, or a path under the trainer's memory folder) with the scan instead of
training from scratch, writing a new memory (`--output`).
"""
from __future__ import annotations

import argparse
import json
import sys

import yaml

from m3_memory.cli.common import FAILED, INTERRUPTED, add_settings

# After Ctrl-C, how long the trainer may take to stop and report (it checks for a cancel every iteration).
CANCELLED_RESULT_TIMEOUT = 60.0


def register(verbs) -> None:
    parser = verbs.add_parser(
        "train-remote", help="have the running trainer node (/m3/train action) train a memory: progress, result",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("scene", nargs="?", default=None, help="scene directory on the trainer's disk")
    what.add_argument("--scan", default=None, metavar="ID", help="a recorder's scan id (or its scene_dir)")
    parser.add_argument("--robot", default="", metavar="NAME",
                        help="with --scan: the namespace of the recorder that has the scan (default: the trainer's)")
    add_settings(parser, "override training settings, e.g. --set iterations=500 densify.refine_every=50")
    parser.add_argument("--output", default="", help="memory file name (relative to the trainer's memory folder; "
                                                     "default <scan or scene name>.pt)")
    parser.add_argument("--live", action="store_true",
                        help="train while the scan records, publishing the memory as it grows (no scan given: the "
                             "one recording now)")
    parser.add_argument("--base-memory", default="", metavar="ID|PATH",
                        help="update this memory on the trainer with the scan instead of training from scratch")
    parser.add_argument("--namespace", default="", metavar="NS",
                        help="namespace of the trainer and recorder (the launch file's namespace:=), e.g. robot1")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for the trainer (and the recorder's status) to appear")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def last_scan(node, topic: str, timeout: float, recording: bool = False) -> str:
    """`scene_dir` of the scan the recorder finished last (`recording`: the one it records now), from its latched
    status on `topic`."""
    from m3_msgs.msg import RecorderStatus

    from m3_memory.ros.graph_client import spin_until
    from m3_memory.ros.qos import LATCHED
    from rclpy.task import Future

    future = Future()

    def on_status(msg) -> None:
        if not future.done():
            future.set_result(msg)

    node.create_subscription(RecorderStatus, topic, on_status, LATCHED)
    try:
        status = spin_until(node, future, timeout, f"the recorder's status {topic}")
    except TimeoutError:
        raise ValueError(f"no recorder status on {topic} within {timeout:.0f} s: name the scan (--scan ID) or the scene "
                         "directory, or check the recorder runs in this namespace and ROS_DOMAIN_ID") from None
    if recording and not status.recording:
        raise ValueError("the recorder is not recording: start a scan first (--live trains the one that records), or "
                         "name a finished one with --scan")
    if status.recording and not recording:
        raise ValueError(f"the recorder is still recording into {status.scene_dir}: stop the scan first "
                         "(or name it with --scan to train as soon as it ends, or train it now with --live)")
    if not status.scene_dir:
        raise ValueError("the recorder has not recorded a scan yet: start and stop one first")
    return status.scene_dir


def postfix(f) -> str:
    """The bar's text for a Train feedback: loss and ETA while iterating, the job's latest memory and its age."""
    parts = [f"loss={f.loss:.4f}", f"eta={f.eta_seconds:.0f}s"] if f.iteration else []
    if f.views_in_memory:
        banks = ",".join(f"{model}:{size}" for model, size in zip(f.bank_models, f.bank_sizes))
        parts.append(f"memory {f.views_in_memory} views, {f.num_gaussians} Gaussians, bank {banks}")
    if f.memory_age_seconds >= 0:
        parts.append(f"served {f.memory_age_seconds:.0f}s ago")
    return ", ".join(parts)


class FeedbackBar:
    """One tqdm bar on stderr per stage of the goal (queued, fetching bytes, features, training iterations) and per
    live step (waiting, training, live, refining: iterations, with the memory published last)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.stage = enabled, None, None

    def __call__(self, message) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        f = message.feedback
        stage = f.stage or "training"
        fetching = stage == "fetching"
        # counted: the scan's bytes while fetching, iterations while training or updating (each live step anew);
        # the other stages only show their time
        done, total = (f.bytes_done, f.bytes_total) if fetching else (0, 0) if stage in ("queued", "features") \
            else (f.iteration, f.total_iterations)
        if stage == self.stage and self.bar is not None and done < self.bar.n:   # a new live step
            self.close()
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total or None, desc=stage, unit="B" if fetching else "it", unit_scale=fetching,
                            file=sys.stderr)
        if total and self.bar.total != total:
            self.bar.total = total
        if stage == "queued":
            self.bar.set_postfix_str(f"{f.queue_position} ahead")
        elif stage != "features":
            self.bar.set_postfix_str(postfix(f))
        self.bar.update(max(0, done - self.bar.n))

    def close(self, stop: bool = False) -> None:
        """End the stage's bar; `stop`: draw nothing more (feedback may still arrive while a cancel is answered)."""
        if self.bar is not None:
            self.bar.close()
        self.bar, self.stage = None, None
        self.enabled = self.enabled and not stop


def run(args) -> int:
    from m3_msgs.action import Train
    from rclpy.action import ActionClient

    from m3_memory.core.pipeline import parse_overrides
    from m3_memory.ros.graph_client import cancel_goal, client_node, namespaced, send_goal, wait_result

    train = namespaced(args.namespace, "m3/train")
    overrides = parse_overrides(args.set)
    if args.robot and args.scan is None:
        raise ValueError("--robot names where a --scan comes from: give --scan ID as well")
    with client_node("m3_train_remote") as node:
        scan = args.scan
        if scan is None and args.scene is None:
            scan = last_scan(node, namespaced(args.namespace, "m3/recorder/status"), args.timeout, args.live)
        goal = Train.Goal(scene_dir=args.scene or "", scan_id=scan or "", robot=args.robot.strip("/"),
                          output=args.output, config_overrides=yaml.safe_dump(overrides) if overrides else "",
                          live=args.live, base_memory=args.base_memory)
        what = (("live " if args.live else "") + (f"scan {scan}" + (f" of {args.robot}" if args.robot else "")
                                                    if scan else f"scene {args.scene}")
                + (f" on top of {args.base_memory}" if args.base_memory else ""))
        print(f"training {what} on {train}" + (f" with {overrides}" if overrides else ""), file=sys.stderr, flush=True)
        bar = FeedbackBar(not args.no_progress)
        client = ActionClient(node, Train, train)
        handle = None
        try:
            handle = send_goal(node, client, train, goal, bar, args.timeout)
            if not handle.accepted:
                print(f"m3 train-remote: {train} rejected the goal", file=sys.stderr)
                return FAILED
            status, result = wait_result(node, handle)
        except TimeoutError as exc:
            bar.close()
            print(f"m3 train-remote: {exc}", file=sys.stderr)
            return FAILED
        except KeyboardInterrupt:
            bar.close(stop=True)
            if handle is None or not handle.accepted:
                return INTERRUPTED
            print("m3 train-remote: cancelling the training ...", file=sys.stderr, flush=True)
            if not cancel_goal(node, handle):
                print(f"m3 train-remote: {train} did not confirm the cancel", file=sys.stderr)
                return INTERRUPTED
            try:
                status, result = wait_result(node, handle, CANCELLED_RESULT_TIMEOUT)
            except (TimeoutError, KeyboardInterrupt):
                print("m3 train-remote: cancel requested; the trainer has not reported yet", file=sys.stderr)
                return INTERRUPTED
            print(f"m3 train-remote: {status.lower()}: {result.message}", file=sys.stderr)
            return INTERRUPTED
        finally:
            bar.close()
            client.destroy()
    report = {"status": status, "success": result.success, "message": result.message,
              "checkpoint": result.checkpoint, "iterations": result.iterations, "gaussians": result.num_gaussians,
              "psnr": round(result.psnr, 2), "final_loss": round(result.final_loss, 5),
              "train_s": round(result.train_seconds, 1)}
    if args.json:
        print(json.dumps(report))
    elif result.success:
        print(f"memory: {result.checkpoint} ({result.num_gaussians} Gaussians, PSNR {result.psnr:.1f} dB, "
              f"{result.iterations} iterations in {result.train_seconds:.0f} s)")
    if not result.success:
        print(f"m3 train-remote: {status.lower()}: {result.message}", file=sys.stderr)
        return FAILED
    return 0
