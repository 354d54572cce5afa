#!/usr/bin/env bash
# One command from a fresh clone to a working m3-memory: a Python 3.11 venv with torch, the ROS 2 Kilted wheels, the
# interface packages built into the venv prefix, and m3_memory + m3_bringup installed. Safe to run again: finished steps
# are skipped (interfaces are rebuilt only when their sources change).
#   M3_VENV   venv location (default: <repo>/.venv)
#   PYTHON    interpreter to create it with (default: python3.11; the ROS wheels are cp311 only)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${M3_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
START=$(date +%s)

log() { printf '[setup %s] %s\n' "$(date +%T)" "$*"; }
die() { log "ERROR: $*"; exit 1; }
# pip prints a warning per missing local index folder; keep real messages only.
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
  | { grep -v "^WARNING: Location '.*' is ignored" || true; }; return "${PIPESTATUS[0]}"; }

command -v "$PYTHON" >/dev/null || die "$PYTHON not found: the ROS 2 wheels need CPython 3.11"
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing cmake and g++ (apt)"
    apt-get update -qq && apt-get install -y -qq cmake g++ >/dev/null
  else
    die "cmake and g++ are needed to build the interface packages: install them (apt-get install cmake g++)"
  fi
fi

# Headless Chromium and its driver for the viewer's browser test (test/test_viewer.py); optional elsewhere.
if ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing chromium and chromium-driver (apt)"
    apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    log "chromium-driver missing (not root): test/test_viewer.py needs it (apt-get install chromium chromium-driver)"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi

log "installing torch"
# torchvision (needed by open_clip) imports only beside the matching torch build, so both are pinned together; on a
# machine without a GPU the build runs on the CPU.
pip_install torch==2.14.1 torchvision==0.29.1
log "installing Python dependencies"
pip_install -r "$ROOT/requirements.txt"
log "installing ROS 2 Kilted wheels"
pip_install -r "$ROOT/requirements-ros.txt"

# Interface packages: m3_msgs, and standard ones missing from PyPI (tf2_msgs). Built with plain cmake into the venv,
# which is itself an ament prefix.
build_interfaces() {
  local src=$1 name stamp digest
  name=$(basename "$src")
  stamp="$VENV/share/$name/.m3_source_digest"
  digest=$(cd "$src" && find . -type f ! -name '*.pyc' | LC_ALL=C sort | xargs sha256sum \
           | cat - "$ROOT/m3_msgs/cmake/fix_wheel_python_includes.cmake" | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
    log "interfaces $name up to date"
    return
  fi
  log "building interfaces $name"
  local build="$VENV/var/m3_build/$name"
  rm -rf "$build"
  AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV" cmake -S "$src" -B "$build" -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF >"$build.log" 2>&1 \
    && cmake --build "$build" -j "$(nproc)" >>"$build.log" 2>&1 \
    && cmake --install "$build" >>"$build.log" 2>&1 \
    || { tail -30 "$build.log"; die "building $name failed (full log: $build.log)"; }
  echo "$digest" >"$stamp"
}
mkdir -p "$VENV/var/m3_build"
if ! "$VENV/bin/python" -c "import tf2_msgs.msg" 2>/dev/null || [ -f "$VENV/share/tf2_msgs/.m3_source_digest" ]; then
  build_interfaces "$ROOT/scripts/venv_interfaces/tf2_msgs"
fi
build_interfaces "$ROOT/m3_msgs"

log "installing m3_memory and m3_bringup"
pip_install --no-deps --no-build-isolation -e "$ROOT"
pip_install --no-deps --no-build-isolation "$ROOT/m3_bringup"
# Share files link to the source tree (as colcon --symlink-install does), so launch/ and config/ are found through
# the ament index and edits apply at once: an editable install leaves data_files out, a plain one copies them.
link_share() {  # PACKAGE SOURCE_DIR ITEM...
  local package=$1 source=$2 item
  shift 2
  mkdir -p "$VENV/share/$package"
  for item in "$@"; do
    if [ -e "$source/$item" ]; then rm -rf "${VENV:?}/share/$package/$item" && ln -sfn "$source/$item" "$VENV/share/$package/$item"; fi
  done
}
mkdir -p "$VENV/share/ament_index/resource_index/packages"
touch "$VENV/share/ament_index/resource_index/packages/m3_memory"
link_share m3_memory "$ROOT" package.xml launch config
link_share m3_bringup "$ROOT/m3_bringup" launch config rviz

# Processes of this venv find ament packages (share/, the resource index) without sourcing anything.
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat >"$SITE/m3_ament_prefix.pth" <<'PTH'
import os, sys; _p = os.environ.get("AMENT_PREFIX_PATH", ""); sys.prefix in _p.split(os.pathsep) or os.environ.__setitem__("AMENT_PREFIX_PATH", os.pathsep.join(x for x in (_p, sys.prefix) if x))
PTH

log "building the CPU rasterizer"
"$VENV/bin/python" -m m3_memory.cli.build_raster >"$VENV/var/m3_build/raster.log" 2>&1 \
  || { tail -30 "$VENV/var/m3_build/raster.log"; die "building the CPU rasterizer failed"; }

# The venv's ros2 front end, only where no real ros2cli is importable (never over a ROS 2 install).
if "$VENV/bin/python" -c "import ros2cli" 2>/dev/null; then
  log "ros2cli found: leaving the real ros2 command alone"
else
  cat >"$VENV/bin/ros2" <<SH
#!/bin/sh
# ros2 front end of the m3-memory venv (see m3_memory/venv_ros2); written by scripts/setup.sh.
exec "$VENV/bin/python" -m m3_memory.venv_ros2 "\$@"
SH
  chmod +x "$VENV/bin/ros2"
fi

"$VENV/bin/python" -c "import rclpy, torch, m3_msgs.srv, tf2_msgs.msg, m3_memory" \
  || die "the venv does not import rclpy/torch/m3_msgs/tf2_msgs/m3_memory"
log "done in $(( $(date +%s) - START )) s; venv $VENV is $(du -sh "$VENV" | cut -f1)"
log "activate with: source $VENV/bin/activate   (or call $VENV/bin/ros2, $VENV/bin/m3 directly)"
