"""colcon sees the three packages as a ROS 2 workspace does (the build itself: test_install.py)."""
import subprocess

from conftest import REPO, VENV_BIN

BASE_PATHS = [".", "m3_msgs", "m3_bringup"]


def colcon(*args, cwd, timeout=600):
    return subprocess.run([str(VENV_BIN / "colcon"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_colcon_finds_the_three_packages():
    result = colcon("--log-base", "/dev/null", "list", "--base-paths", *BASE_PATHS, cwd=REPO)   # no log/ here
    assert result.returncode == 0, result.stderr
    listed = {line.split("\t")[0]: line.split("\t")[2] for line in result.stdout.splitlines()}
    assert listed == {"m3_memory": "(ros.ament_python)", "m3_msgs": "(ros.ament_cmake)",
                      "m3_bringup": "(ros.ament_python)"}

