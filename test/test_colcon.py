"""The packages build with colcon as in a ROS 2 workspace (nothing venv-specific may break that)."""
import shutil
import subprocess
import sys

from conftest import REPO, VENV_BIN

BASE_PATHS = [".", "m3_msgs", "m3_bringup"]


def colcon(*args, cwd, timeout=600):
    return subprocess.run([str(VENV_BIN / "colcon"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_colcon_finds_the_three_packages():
    result = colcon("list", "--base-paths", *BASE_PATHS, cwd=REPO)
    assert result.returncode == 0, result.stderr
    listed = {line.split("\t")[0]: line.split("\t")[2] for line in result.stdout.splitlines()}
    assert listed == {"m3_memory": "(ros.ament_python)", "m3_msgs": "(ros.ament_cmake)",
                      "m3_bringup": "(ros.ament_python)"}


def test_colcon_build_installs_nodes_launch_and_interfaces(tmp_path):
    source = tmp_path / "src" / "m3-memory"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    base = ["src/m3-memory", "src/m3-memory/m3_msgs", "src/m3-memory/m3_bringup"]
    result = colcon("build", "--base-paths", *base, "--cmake-args", "-DBUILD_TESTING=OFF",
                    f"-DPython3_EXECUTABLE={sys.executable}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    install = tmp_path / "install"
    for executable in ("m3_recorder", "m3_trainer", "m3_memory_server"):
        assert (install / "m3_memory" / "lib" / "m3_memory" / executable).is_file()
    assert (install / "m3_bringup" / "share" / "m3_bringup" / "launch" / "scan_and_grasp.launch.py").is_file()
    assert (install / "m3_bringup" / "share" / "m3_bringup" / "config" / "memory_server.yaml").is_file()
    assert list((install / "m3_msgs").rglob("m3_msgs/srv/_locate.py"))
