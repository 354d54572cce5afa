"""The installed package runs from its own files (issue #13): a real `colcon build` (no --symlink-install) sourced in
a bash, and a wheel in a fresh venv, each run `m3 demo-scene --size tiny`, `m3 train` and `m3 query` in a folder
outside the repository, and every file the code reads (config, bundled weights, rasterizer source) comes from the
install, never from this checkout."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO, VENV_BIN

# What the code resolves, printed by the interpreter the installed commands run with.
PROBE = """
import json, m3_memory
from m3_memory.core import pipeline
from m3_memory.core.features import registry
from m3_memory.core.raster import extension
default, configs = registry.load_configs()
print(json.dumps({"package": m3_memory.__file__, "train_config": str(pipeline.DEFAULT_TRAIN_CONFIG),
                  "features_config": str(registry.DEFAULT_CONFIG), "weights": str(configs[default].weights_path()),
                  "raster_source": str(extension.SOURCES[0]), "raster_build": str(extension.build_dir())}))
"""
QUERY = "yellow bath duck"


def copy_checkout(destination):
    """The working tree's files (tracked and untracked, not ignored), as a fresh clone would have them."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)


def clean_env(tmp_path, **extra):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", M3_CACHE_DIR=str(tmp_path / "user_cache"), **extra)
    return env


def bash(script, cwd, env, timeout=600):
    result = subprocess.run(["bash", "-c", f"set -e\n{script}"], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{script}\nexited {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result


def last_json(output):
    return json.loads(output.strip().splitlines()[-1])


def run_demo_flow(prefix, m3, python, cwd, env, install_root):
    """demo-scene -> train (5 iterations, CPU rasterizer) -> query, each through `m3` after `prefix`; returns the
    probe and the train step's stderr. Asserts every resolved file lies under `install_root`."""
    probe = last_json(bash(f"{prefix}{python} -c {shlex.quote(PROBE)}", cwd, env).stdout)
    for key in ("package", "train_config", "features_config", "weights", "raster_source"):
        assert probe[key].startswith(str(install_root)), (key, probe[key])
        assert not probe[key].startswith(str(REPO)), (key, probe[key])
    assert os.path.isfile(probe["weights"]) and os.path.isfile(probe["raster_source"])

    bash(f"{prefix}{m3} demo-scene --size tiny --out scene", cwd, env)
    assert (cwd / "scene" / "scene.json").is_file()
    trained = bash(f"{prefix}{m3} train scene --set iterations=5 device=cpu", cwd, env)
    summary = last_json(trained.stdout)
    assert summary["iterations"] == 5 and summary["gaussians"] > 0
    assert (cwd / "scene" / "memory.pt").is_file()
    answer = last_json(bash(f"{prefix}{m3} query scene/memory.pt {shlex.quote(QUERY)} --min-relevancy 0", cwd,
                            env).stdout)
    assert answer["query"] == QUERY and answer["frame_id"] == "world" and len(answer["target"]) == 3
    return probe, trained.stderr


def test_colcon_install_without_symlinks_runs_from_its_install(tmp_path):
    workspace = tmp_path / "ws"
    copy_checkout(workspace / "src" / "m3-memory")
    base = ["src/m3-memory", "src/m3-memory/m3_msgs", "src/m3-memory/m3_bringup"]
    build = subprocess.run([str(VENV_BIN / "colcon"), "build", "--base-paths", *base, "--cmake-args",
                            "-DBUILD_TESTING=OFF", f"-DPython3_EXECUTABLE={sys.executable}"],
                           cwd=workspace, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    install = workspace / "install"
    for executable in ("m3_recorder", "m3_trainer", "m3_memory_server", "m3"):
        assert (install / "m3_memory" / "lib" / "m3_memory" / executable).is_file()
    assert (install / "m3_bringup" / "share" / "m3_bringup" / "launch" / "scan_and_grasp.launch.py").is_file()
    assert (install / "m3_bringup" / "share" / "m3_bringup" / "config" / "memory_server.yaml").is_file()
    assert list((install / "m3_msgs").rglob("m3_msgs/srv/_locate.py"))
    # The venv stands in for the ROS 2 underlay (/opt/ros/...); its bin/ gives `ros2`, as a distro's PATH would.
    env = clean_env(tmp_path, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    probe, _ = run_demo_flow(f"source {shlex.quote(str(install / 'setup.bash'))}\n", "ros2 run m3_memory m3",
                             "python", run_dir, env, install / "m3_memory")
    assert probe["train_config"] == str(install / "m3_memory/share/m3_memory/config/train.yaml")
    assert probe["package"].startswith(str(install / "m3_memory/lib"))


def test_wheel_in_a_fresh_venv_runs_from_its_install(tmp_path):
    source = tmp_path / "src"
    copy_checkout(source)
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True,
                           timeout=300)
    assert wheel.returncode == 0, wheel.stdout[-3000:] + wheel.stderr[-3000:]
    [wheel_file] = (tmp_path / "dist").glob("m3_memory-*.whl")

    # A fresh venv that sees the project venv's packages (torch, ...) through a plain path entry: .pth files there
    # (the editable m3_memory's finder among them) are not run, so the only m3_memory is the wheel's.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    fresh_python = venv / "bin" / "python"
    site = subprocess.run([str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = clean_env(tmp_path, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop("AMENT_PREFIX_PATH", None)  # a plain Python user: no ROS environment at all
    install = subprocess.run([str(fresh_python), "-m", "pip", "install", "--no-deps", "--ignore-installed",
                              "--no-index", "-q", str(wheel_file)], env=env, capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    # The install's build location cannot be made (a read-only install: root ignores permission bits, so a file
    # stands in the way), so the first `m3 train` compiles the rasterizer from the wheel's source into the user cache.
    share = venv / "share" / "m3_memory"
    (share / "m3_raster_cpu").write_text("not a directory")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    probe, train_log = run_demo_flow("", str(venv / "bin" / "m3"), str(fresh_python), run_dir, env, venv)
    assert probe["train_config"] == str(share / "config" / "train.yaml")
    cache = tmp_path / "user_cache" / "torch_extensions" / "m3_raster_cpu"
    assert probe["raster_build"] == str(cache)
    assert "compiling the CPU rasterizer into" in train_log and (cache / "m3_raster_cpu.so").is_file()
