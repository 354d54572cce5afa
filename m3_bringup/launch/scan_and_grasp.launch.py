"""Scan a table, train an M3 memory, answer `/m3/locate`: recorder, trainer and memory server.

A real ROS 2 launch file (`ros2 launch m3_bringup scan_and_grasp.launch.py [name:=value ...]`). It also describes its
nodes as plain data (`ARGUMENTS`, `node_descriptions()`), which the project venv's `ros2` front end runs where
launch/launch_ros are absent. Each node reads its YAML in `config_dir`; an argument given here overrides that one
parameter in every node that has it (an empty one leaves the YAML's value), so a robot needs no copied config folder.
Every topic and service is relative (`/tf` and `/tf_static` excepted), so `namespace:=robot1` moves the whole robot.
"""
import os

# name → (default, description); pass as name:=value. An unknown name is refused with this list.
ARGUMENTS = {
    "config_dir": ("", "folder with recorder.yaml, trainer.yaml, memory_server.yaml; empty = m3_bringup's config/"),
    "namespace": ("", "namespace for all nodes (e.g. a robot name): topics and services become /<ns>/m3/..., "
                      "/<ns>/camera/..."),
    "log_level": ("info", "log level of every node: debug, info, warn, error"),
    "use_sim_time": ("false", "true: every node takes its time from /clock (a simulator, `m3 play --clock`)"),
    "checkpoint": ("", "memory file (safetensors m3 memory) the server answers from at start; a trained memory "
                       "replaces it when the trainer announces one"),
    "world_frame": ("", "frame the recorder poses the camera in and the server answers in (REP-105: map or odom); "
                        "empty = the YAML's (recorder: world; server: the memory's own frame)"),
    "color_topic": ("", "colour image topic (sensor_msgs/Image); empty = recorder.yaml's camera/color/image_raw"),
    "depth_topic": ("", "depth image aligned to colour; empty = recorder.yaml's "
                        "camera/aligned_depth_to_color/image_raw"),
    "camera_info_topic": ("", "CameraInfo of the colour stream (recorder and server); empty = the YAML's "
                              "camera/color/camera_info"),
    "camera_frame": ("", "the camera's optical frame, the server's live view; empty = memory_server.yaml's "
                         "camera_color_optical_frame"),
    "color_transport": ("", "raw, or compressed (image_transport: CompressedImage on <color_topic>/compressed); "
                            "empty = raw"),
    "depth_transport": ("", "raw, compressed or compressedDepth (RealSense's PNG depth on "
                            "<depth_topic>/compressedDepth); empty = raw"),
    "image_reliability": ("", "auto (as the camera publishes), reliable or best_effort; empty = auto"),
    "models": ("", "comma-separated feature models the trainer distils, e.g. m3-tinyvlm,clip; empty = the trainer's"),
    "device": ("", "where the trainer runs: auto (CUDA when present), cpu, cuda or cuda:N; empty = the trainer's"),
    "scan_root": ("", "folder of scans: the recorder writes there, the trainer reads only there; empty = scans"),
    "memory_root": ("", "folder of memories: the trainer writes there, the server loads announced ones only from "
                        "there; empty = memories"),
    "storage_root": ("", "folder where the trainer keeps fetched scans and their memories per robot (the server "
                         "loads this robot's from there too); empty = storage"),
    "viewer_port": ("", "> 0: the server serves the browser viewer (m3 view) on this port; empty = off"),
    "nodes": ("recorder,trainer,memory_server", "the nodes this computer runs (comma-separated): a robot runs "
                                                "recorder,memory_server and a GPU worker trainer"),
    "memory_source": ("", "the server fetches its robot's memories over ROS from this trainer (e.g. /m3/trainer, a "
                          "worker on another computer); empty = only memories on this computer's disk"),
    "live": ("", "true: the trainer trains each scan the recorder starts while it records, and the server swaps in "
                 "each memory it publishes; empty = trainer.yaml's (false)"),
    "publish_every_s": ("", "live mode: at most this often (seconds) the trainer publishes the growing memory; empty "
                            "= trainer.yaml's (10)"),
}

NODES = (
    ("m3_recorder", "recorder"),
    ("m3_trainer", "trainer"),
    ("m3_memory_server", "memory_server"),
)


def _config_dir(value: str) -> str:
    if value:
        return value
    from ament_index_python.packages import get_package_share_directory

    return os.path.join(get_package_share_directory("m3_bringup"), "config")


def _device(text: str) -> str:
    kind, colon, index = text.partition(":")
    if text in ("auto", "cpu", "cuda") or kind == "cuda" and colon and index.isdigit():
        return text
    raise ValueError(f"launch argument device:={text!r} must be auto, cpu, cuda or cuda:N")


def overrides(values: dict) -> dict[str, dict]:
    """Node name → the parameters the launch argument `values` set in it (arguments left empty set nothing)."""
    from m3_memory.ros import launch_support as arg

    given = {name: text for name, text in values.items() if text != ""}
    every = {"use_sim_time": arg.flag("use_sim_time", values["use_sim_time"])}
    recorder, trainer, server = dict(every), dict(every), dict(every)
    if "checkpoint" in given:
        server["checkpoint"] = arg.existing_file("checkpoint", given["checkpoint"])
    if "world_frame" in given:
        recorder["world_frame"] = server["world_frame"] = arg.frame("world_frame", given["world_frame"])
    for name in ("color_topic", "depth_topic"):
        if name in given:
            recorder[name] = arg.topic(name, given[name])
    if "camera_info_topic" in given:
        recorder["camera_info_topic"] = server["camera_info_topic"] = arg.topic("camera_info_topic",
                                                                                given["camera_info_topic"])
    if "camera_frame" in given:
        server["camera_frame"] = arg.frame("camera_frame", given["camera_frame"])
    if {"color_transport", "depth_transport", "image_reliability"} & set(given):
        from m3_memory.ros.recorder import RELIABILITY, TRANSPORTS

        for stream in ("color", "depth"):
            if f"{stream}_transport" in given:
                recorder[f"{stream}_transport"] = arg.choice(f"{stream}_transport", given[f"{stream}_transport"],
                                                             TRANSPORTS[stream])
        if "image_reliability" in given:
            recorder["image_reliability"] = arg.choice("image_reliability", given["image_reliability"],
                                                       ("auto", *RELIABILITY))
    if "models" in given:
        trainer["models"] = arg.names("models", given["models"])
    if "device" in given:
        trainer["device"] = _device(given["device"])
    if "scan_root" in given:
        recorder["output_root"], trainer["scene_roots"] = given["scan_root"], [given["scan_root"]]
    if "memory_root" in given:
        trainer["output_root"] = server["memory_root"] = given["memory_root"]
    if "storage_root" in given:
        trainer["storage_root"] = server["storage_root"] = given["storage_root"]
    if "memory_source" in given:
        server["memory_source"] = arg.topic("memory_source", given["memory_source"])
    if "live" in given:
        trainer["live"] = arg.flag("live", given["live"])
    if "publish_every_s" in given:
        trainer["publish_every_s"] = arg.number("publish_every_s", given["publish_every_s"], float, minimum=0)
    if "viewer_port" in given:
        server["viewer_port"] = arg.number("viewer_port", given["viewer_port"], int, minimum=0)
    return {"recorder": recorder, "trainer": trainer, "memory_server": server}


def node_descriptions(arguments: dict) -> list:
    """Keyword arguments of `launch_ros.actions.Node` for each node, given launch argument values (strings)."""
    from m3_memory.ros.launch_support import argument_values

    values = argument_values(ARGUMENTS, arguments)
    config_dir = _config_dir(values["config_dir"])
    parameters = overrides(values)
    chosen = chosen_nodes(values["nodes"])
    return [
        {
            "package": "m3_memory",
            "executable": executable,
            "name": name,
            "namespace": values["namespace"],
            # later entries override earlier ones: the YAML, then the launch arguments given
            "parameters": [os.path.join(config_dir, f"{name}.yaml"), parameters[name]],
            "ros_arguments": ["--log-level", values["log_level"]],
        }
        for executable, name in NODES if name in chosen
    ]


def chosen_nodes(text: str) -> set[str]:
    """The `nodes:=` argument as node names, each one of NODES."""
    from m3_memory.ros import launch_support as arg

    names = set(arg.names("nodes", text))
    known = {name for _, name in NODES}
    if not names or names - known:
        raise ValueError(f"launch argument nodes:={text!r} must name some of {', '.join(sorted(known))}")
    return names


def generate_launch_description():
    from m3_memory.ros.launch_support import launch_description

    return launch_description(ARGUMENTS, node_descriptions)
