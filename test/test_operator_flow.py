"""The README's "Using it" operator flow, run as written: its commands are read from the README's code block and each
runs as a real process (the launch in the background) from one folder, as an operator would type them; then the
located target is checked against the demo scene's ground truth."""
import json
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, VENV_BIN, interrupt, wait_for
from test_demo import CONFUSED, TOLERANCE_M
from test_ros2_frontend import response_of


def readme_commands() -> list[list[str]]:
    """argv of each command in the first bash block of the README's "## Using it" section (comments dropped)."""
    section = (REPO / "README.md").read_text().split("\n## Using it", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [argv for argv in (shlex.split(line, comments=True) for line in block.splitlines()) if argv]


def run(argv: list[str], cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    result = subprocess.run([str(VENV_BIN / argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{shlex.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def test_readme_commands_are_the_operator_flow():
    verbs = [" ".join(argv[:3]) for argv in readme_commands()]
    assert verbs[1:] == ["ros2 launch m3_bringup", "ros2 service call", "m3 play data/tiny/bag", "ros2 service call",
                         "m3 train-remote --set", "ros2 service call", "ros2 topic echo"], verbs
    assert readme_commands()[0][:2] == ["m3", "demo-scene"]


@pytest.fixture(scope="module")
def operator_flow(tmp_path_factory):
    """Every README command's output, in order, keyed by its position; the launch's log under "launch"."""
    cwd = tmp_path_factory.mktemp("operator")
    commands = readme_commands()
    outputs, launch = {}, None
    log = open(cwd / "launch.log", "w")
    try:
        for index, argv in enumerate(commands):
            if argv[:2] == ["ros2", "launch"]:
                launch = subprocess.Popen([str(VENV_BIN / argv[0]), *argv[1:]], cwd=cwd, stdout=log,
                                          stderr=subprocess.STDOUT)
                continue
            if argv[:3] == ["ros2", "service", "call"] and "locate" in argv[3]:
                # "the server answers from it as soon as it has loaded": what the README says to watch
                trained = next(o for o in outputs.values() if o.args[1] == "train-remote").stdout
                checkpoint = re.search(r"memory: (\S+)", trained).group(1)
                status = {}

                def loaded():
                    status.update(yaml.safe_load(run(["ros2", "topic", "echo", "/m3/memory_status", "--once"],
                                                     cwd).stdout.split("---")[0]))
                    return status["loaded"] and status["checkpoint"] == checkpoint

                assert wait_for(loaded, timeout=180, interval=1.0), (status, (cwd / "launch.log").read_text()[-3000:])
                outputs["m3 locate"] = run(["m3", "locate", *argv[4:], "--json"], cwd)
            outputs[index] = run(argv, cwd, timeout=1200 if argv[:2] == ["m3", "train-remote"] else 120)
        yield cwd, commands, outputs
    finally:
        if launch is not None and launch.poll() is None:
            interrupt(launch, 60)
        log.close()


def test_scan_train_locate_as_written(operator_flow):
    cwd, commands, outputs = operator_flow
    start, stop = (response_of(outputs[i].stdout) for i, argv in enumerate(commands)
                   if argv[:3] == ["ros2", "service", "call"] and "recorder" in argv[3])
    assert start["success"] and start["message"].startswith(str(cwd.resolve() / "scans"))
    scan = start["message"]
    kept = re.match(r"kept (\d+) of \d+ frames into (\S+);", stop["message"])
    assert stop["success"] and kept and kept.group(2) == scan and int(kept.group(1)) >= 6, stop

    train = next(outputs[i] for i, argv in enumerate(commands) if argv[:2] == ["m3", "train-remote"])
    assert "training" in train.stderr and "100%" in train.stderr   # the progress bar, fed by the goal's feedback
    assert Path(re.search(r"memory: (\S+)", train.stdout).group(1)).is_file()

    # the answer: the duck, or (m3-tinyvlm's known confusion on the tiny scene, see test_demo) the yellow ball
    objects = json.loads((cwd / "data" / "tiny" / "objects.json").read_text())["objects"]
    truth = {o["phrases"][0]: np.asarray(o["center"]) for o in objects}
    locate = next(i for i, argv in enumerate(commands) if argv[:3] == ["ros2", "service", "call"] and "locate" in argv[3])
    query = commands[locate][4]
    answer = response_of(outputs[locate].stdout)
    assert answer["success"], answer["message"]
    target = np.array([answer["target"]["point"][axis] for axis in "xyz"])
    errors = [np.linalg.norm(target - truth[name]) for name in (query, CONFUSED.get(query, query))]
    assert min(errors) < TOLERANCE_M, (target, errors)
    m3_answer = json.loads(outputs["m3 locate"].stdout.strip().splitlines()[-1])
    assert m3_answer["success"] and np.allclose(m3_answer["target"], target, atol=1e-3)

    status = yaml.safe_load(outputs[len(commands) - 1].stdout.split("---")[0])
    assert status["recording"] is False and status["scene_dir"] == scan and status["frames_kept"] == int(kept.group(1))
