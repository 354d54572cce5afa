"""ament_python package m3_bringup: launch files and their configuration, no Python modules of its own."""
from glob import glob

from setuptools import setup

PACKAGE = "m3_bringup"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=[],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/rviz", glob("rviz/*.rviz")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="m3-memory maintainers",
    maintainer_email="maintainers@m3-memory.dev",
    description="Launch files and configuration of m3-memory.",
    license="Apache-2.0",
)
