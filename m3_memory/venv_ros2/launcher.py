"""`ros2 launch PKG FILE [name:=value ...]` without launch/launch_ros.

Our launch files keep their node list as plain data (`ARGUMENTS` and `node_descriptions(arguments)`, the same keyword
arguments `launch_ros.actions.Node` takes); this module starts each node as a process with those parameters, prefixes its
output with its name, forwards SIGINT/SIGTERM, and escalates to SIGTERM then SIGKILL for nodes that do not stop.
"""
from __future__ import annotations

import ctypes
import importlib.util
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from m3_memory.venv_ros2 import executables

STOP_GRACE_SECONDS = 10.0
PR_SET_PDEATHSIG = 1


@dataclass
class NodeProcess:
    name: str
    command: list[str]
    process: subprocess.Popen | None = None
    reader: threading.Thread | None = field(default=None, repr=False)


def find_launch_file(package: str, file_name: str) -> Path:
    given = Path(file_name)
    if given.is_file():
        return given
    candidate = executables.share_directory(package) / "launch" / file_name
    if not candidate.is_file():
        raise FileNotFoundError(f"launch file {file_name!r} not found in package {package!r} ({candidate})")
    return candidate


def load_launch_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"launch_file_{path.stem.replace('.', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "node_descriptions"):
        raise ValueError(f"{path} has no node_descriptions(): this front end runs only launch files that describe "
                         "their nodes as data (install ROS 2 to run other launch files)")
    return module


def parse_launch_arguments(items: list[str], declared: dict) -> dict[str, str]:
    values = {}
    for item in items:
        name, sep, value = item.partition(":=")
        if not sep or not name:
            raise ValueError(f"launch argument {item!r} must be written name:=value")
        if name not in declared:
            raise ValueError(f"unknown launch argument {name!r}; declared: {', '.join(declared) or 'none'}")
        values[name] = value
    return values


def node_command(description: dict) -> list[str]:
    """launch_ros-style node description → argv with `--ros-args` (remaps, parameter files, parameters)."""
    command = [executables.find(description["package"], description["executable"])]
    command += [str(a) for a in description.get("arguments", [])]
    ros_args = []
    if description.get("name"):
        ros_args += ["-r", f"__node:={description['name']}"]
    if description.get("namespace"):
        ros_args += ["-r", f"__ns:=/{description['namespace'].strip('/')}"]
    for source, target in description.get("remappings", []):
        ros_args += ["-r", f"{source}:={target}"]
    for parameters in description.get("parameters", []):
        if isinstance(parameters, dict):
            for key, value in parameters.items():
                ros_args += ["-p", f"{key}:={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
        else:
            if not Path(parameters).is_file():
                raise FileNotFoundError(f"parameter file {parameters} of node {description.get('name')} does not exist")
            ros_args += ["--params-file", str(parameters)]
    ros_args += [str(a) for a in description.get("ros_arguments", [])]
    return command + (["--ros-args", *ros_args] if ros_args else [])


def _die_with_parent():
    # A launcher killed with SIGKILL cannot forward anything; have the kernel stop its nodes instead of orphaning them.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _pump(node: NodeProcess) -> None:
    for line in node.process.stdout:
        sys.stdout.write(f"[{node.name}] {line}")
        sys.stdout.flush()


def log(message: str) -> None:
    print(f"[launch] {message}", flush=True)


def run_nodes(nodes: list[NodeProcess]) -> int:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for node in nodes:
            # Own process group: a terminal's Ctrl-C reaches only the launcher, which forwards exactly one SIGINT.
            node.process = subprocess.Popen(node.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            bufsize=1, process_group=0, preexec_fn=_die_with_parent)
            node.reader = threading.Thread(target=_pump, args=(node,), daemon=True)
            node.reader.start()
            log(f"process started with pid [{node.process.pid}]: {node.name}")
        reported = set()
        while not stop.is_set() and len(reported) < len(nodes):
            for node in nodes:
                code = node.process.poll()
                if code is not None and node.name not in reported:
                    reported.add(node.name)
                    log(f"process {node.name} exited with code {code}")
            stop.wait(0.1)
        if stop.is_set():
            log("shutting down: sending SIGINT to every node")
        return _stop_all(nodes, reported)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_all(nodes: list[NodeProcess], reported: set[str]) -> int:
    for escalation in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        alive = [n for n in nodes if n.process.poll() is None]
        if not alive:
            break
        if escalation != signal.SIGINT:
            log(f"escalating to {escalation.name} for: {', '.join(n.name for n in alive)}")
        for node in alive:
            node.process.send_signal(escalation)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and any(n.process.poll() is None for n in alive):
            time.sleep(0.05)
    failed = 0
    for node in nodes:
        code = node.process.wait()
        node.reader.join(timeout=1.0)
        if node.name not in reported:
            log(f"process {node.name} exited with code {code}")
        # A node stopped by our SIGINT may report -2 if it had not yet installed rclpy's handler.
        if code not in (0, -signal.SIGINT):
            failed += 1
    return 1 if failed else 0


def launch(package: str, file_name: str, argument_items: list[str]) -> int:
    module = load_launch_module(find_launch_file(package, file_name))
    declared = getattr(module, "ARGUMENTS", {})
    descriptions = module.node_descriptions(parse_launch_arguments(argument_items, declared))
    nodes = []
    for index, description in enumerate(descriptions):
        name = description.get("name") or f"{description['executable']}-{index}"
        nodes.append(NodeProcess(name=name, command=node_command(description)))
    return run_nodes(nodes)
