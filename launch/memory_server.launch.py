"""Only the memory server: for a robot that answers `/m3/locate` from a memory trained elsewhere.

`ros2 launch m3_memory memory_server.launch.py checkpoint:=PATH [namespace:=...] [world_frame:=...] ...`; parameters
not given keep the node's defaults (m3_memory/ros/memory_server.py). Topics are relative: `namespace:=robot1` serves
`/robot1/m3/locate` and reads `/robot1/camera/color/camera_info`.
"""

ARGUMENTS = {
    "namespace": ("", "namespace of the node; the service becomes /<ns>/m3/locate"),
    "checkpoint": ("", "memory file (safetensors m3 memory) to answer from at start"),
    "world_frame": ("", "frame of answers when a request leaves frame_id empty; empty = the memory's own frame"),
    "use_sim_time": ("false", "true: take time from /clock"),
    "camera_info_topic": ("", "CameraInfo of the camera the live view uses; empty = camera/color/camera_info"),
    "camera_frame": ("", "the camera's optical frame (live view from TF); empty = camera_color_optical_frame"),
    "memory_root": ("", "announced memories load only from under this folder; empty = memories"),
    "storage_root": ("", "this robot's memories under <storage_root>/<robot>/memories load too; empty = storage"),
    "viewer_port": ("", "> 0: serve the browser viewer (m3 view) on this port; empty = off"),
    "log_level": ("info", "debug, info, warn, error"),
}


def node_descriptions(arguments: dict) -> list:
    from m3_memory.ros import launch_support as arg

    values = arg.argument_values(ARGUMENTS, arguments)
    given = {name: text for name, text in values.items() if text != ""}
    parameters = {}
    if "world_frame" in given:
        parameters["world_frame"] = arg.frame("world_frame", given["world_frame"])
    parameters["use_sim_time"] = arg.flag("use_sim_time", values["use_sim_time"])
    if "checkpoint" in given:
        parameters["checkpoint"] = arg.existing_file("checkpoint", given["checkpoint"])
    if "camera_info_topic" in given:
        parameters["camera_info_topic"] = arg.topic("camera_info_topic", given["camera_info_topic"])
    if "camera_frame" in given:
        parameters["camera_frame"] = arg.frame("camera_frame", given["camera_frame"])
    if "memory_root" in given:
        parameters["memory_root"] = given["memory_root"]
    if "storage_root" in given:
        parameters["storage_root"] = given["storage_root"]
    if "viewer_port" in given:
        parameters["viewer_port"] = arg.number("viewer_port", given["viewer_port"], int, minimum=0)
    return [{
        "package": "m3_memory",
        "executable": "m3_memory_server",
        "name": "memory_server",
        "namespace": values["namespace"],
        "parameters": [parameters],
        "ros_arguments": ["--log-level", values["log_level"]],
    }]


def generate_launch_description():
    from m3_memory.ros.launch_support import launch_description

    return launch_description(ARGUMENTS, node_descriptions)
