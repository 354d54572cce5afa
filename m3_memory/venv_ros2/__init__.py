"""A small `ros2` front end for the project venv, where no ROS 2 distro (and so no ros2cli) is installed.

`scripts/setup.sh` installs it as `<venv>/bin/ros2`. When the real ros2cli is importable everything is handed to it;
otherwise it supports what m3-memory users need: launch, run, service call/list/type, topic list/echo, node list,
action send_goal/list/info.
"""
