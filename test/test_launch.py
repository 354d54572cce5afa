"""`ros2 launch m3_bringup scan_and_grasp.launch.py` in the venv: every node starts, SIGINT stops them all."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import listed, ros2_launch, run_command, wait_for
from m3_memory.venv_ros2 import executables, launcher

EXPECTED_NODES = {"/recorder", "/trainer", "/memory_server"}


def test_scan_and_grasp_starts_every_node_and_stops_on_sigint(tmp_path):
    log_path = tmp_path / "launch.log"
    with ros2_launch("m3_bringup", "scan_and_grasp.launch.py", cwd=tmp_path) as process:
        assert wait_for(lambda: EXPECTED_NODES <= listed("node", "list"), timeout=30), log_path.read_text()
        pids = [int(p) for p in re.findall(r"pid \[(\d+)\]", log_path.read_text())]
        assert len(pids) == 3
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, log_path.read_text()
    text = log_path.read_text()
    for name in ("recorder", "trainer", "memory_server"):
        assert f"process {name} exited with code 0" in text
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (EXPECTED_NODES & listed("node", "list"))


def test_launch_arguments_reach_the_nodes():
    module = launcher.load_launch_module(launcher.find_launch_file("m3_bringup", "scan_and_grasp.launch.py"))
    nodes = module.node_descriptions({"namespace": "robot1", "log_level": "debug"})
    assert [n["name"] for n in nodes] == ["recorder", "trainer", "memory_server"]
    for node in nodes:
        command = launcher.node_command(node)
        assert command[0] == executables.find("m3_memory", node["executable"])
        assert "__ns:=/robot1" in command and "debug" in command
        params_file = command[command.index("--params-file") + 1]
        assert os.path.isfile(params_file) and params_file.endswith(f"{node['name']}.yaml")


def test_dict_parameters_become_typed_overrides():
    module = launcher.load_launch_module(launcher.find_launch_file("m3_memory", "memory_server.launch.py"))
    command = launcher.node_command(module.node_descriptions({"world_frame": "map"})[0])
    assert command[command.index("-p") + 1] == "world_frame:=map"


def test_bad_launch_arguments_are_refused():
    result = run_command("ros2", "launch", "m3_bringup", "scan_and_grasp.launch.py", "colour:=red")
    assert result.returncode == 2 and "unknown launch argument 'colour'" in result.stderr
    result = run_command("ros2", "launch", "m3_bringup", "scan_and_grasp.launch.py", "namespace=x")
    assert result.returncode == 2 and "name:=value" in result.stderr
    result = run_command("ros2", "launch", "m3_bringup", "missing.launch.py")
    assert result.returncode == 2 and "not found" in result.stderr


def test_a_node_that_ignores_sigint_is_terminated(monkeypatch):
    monkeypatch.setattr(launcher, "STOP_GRACE_SECONDS", 0.5)
    stubborn = launcher.NodeProcess(name="stubborn", command=[
        sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"])
    stubborn.process = subprocess.Popen(stubborn.command, stdout=subprocess.PIPE, text=True)
    stubborn.reader = launcher.threading.Thread(target=lambda: None)
    stubborn.reader.start()
    time.sleep(0.5)
    assert launcher._stop_all([stubborn], set()) == 1
    assert stubborn.process.returncode == -signal.SIGTERM


def test_real_launch_description_when_launch_is_installed():
    pytest.importorskip("launch_ros")
    module = launcher.load_launch_module(launcher.find_launch_file("m3_bringup", "scan_and_grasp.launch.py"))
    assert module.generate_launch_description().entities
