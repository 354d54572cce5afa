"""ament_python package m3_memory (colcon build on a ROS 2 install, or pip install into the project venv)."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "m3_memory"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
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
