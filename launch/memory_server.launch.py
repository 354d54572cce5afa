"""Only the memory server: for a robot that answers `/m3/locate` from a memory trained elsewhere.

`ros2 launch m3_memory memory_server.launch.py [namespace:=...] [world_frame:=...]`
"""

ARGUMENTS = {
    "namespace": ("", "namespace of the node; the service becomes /<ns>/m3/locate"),
    "world_frame": ("world", "frame of answers when a request leaves frame_id empty"),
    "log_level": ("info", "debug, info, warn, error"),
}


def node_descriptions(arguments: dict) -> list:
    from m3_memory.ros.launch_support import argument_values

    values = argument_values(ARGUMENTS, arguments)
    return [{
        "package": "m3_memory",
        "executable": "m3_memory_server",
        "name": "memory_server",
        "namespace": values["namespace"],
        "parameters": [{"world_frame": values["world_frame"]}],
        "ros_arguments": ["--log-level", values["log_level"]],
    }]


def generate_launch_description():
    from m3_memory.ros.launch_support import launch_description

    return launch_description(ARGUMENTS, node_descriptions)
