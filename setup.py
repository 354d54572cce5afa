"""ament_python package m3_memory (colcon build on a ROS 2 install, or pip install into the project venv)."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "m3_memory"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    # Package data, read through importlib.resources (m3_memory/core/resources.py): the bundled m3-tinyvlm weights
    # and the rasterizer's C++ source (compiled on first use). Share files (config, launch) go to share/m3_memory.
    package_data={PACKAGE: ["core/features/weights/*.pt", "core/raster/csrc/*.cpp"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    # Runtime dependencies: package.xml (rosdep) and requirements-runtime.txt (pip), as a ROS 2 package keeps them.
    install_requires=["setuptools"],
    zip_safe=False,  # the rasterizer source is compiled from its installed file
    maintainer="m3-memory maintainers",
    maintainer_email="maintainers@m3-memory.dev",
    description="ROS 2 spatial memory for robots built on M3 (3D-Spatial Multimodal Memory).",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "m3 = m3_memory.cli:main",
            "m3_recorder = m3_memory.ros.recorder:main",
            "m3_trainer = m3_memory.ros.trainer:main",
            "m3_memory_server = m3_memory.ros.memory_server:main",
        ],
    },
)
