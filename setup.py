"""ament_python package scpo_ros: `colcon build` on a ROS 2 distro, `pip install .` elsewhere."""
from glob import glob

from setuptools import find_packages, setup

package_name = "scpo_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        # parameter files, and the Foxglove layout of the demo's topics
        ("share/" + package_name + "/config", sorted(glob("config/*.yaml") + glob("config/*.json"))),
        # the shipped plant files (package://scpo_ros/config/plants/NAME.yaml, docs/plants.md)
        ("share/" + package_name + "/config/plants", sorted(glob("config/plants/*.yaml"))),
    ],
    python_requires=">=3.10",
    # rclpy and the message packages come from the ROS distro, or from the `ros`
    # extra (PyPI wheels of ROS 2 Kilted) where there is no distro.
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "torch>=2.2",
        "daqp>=0.5",
        "matplotlib>=3.6",
        "rosbags>=0.10",
        "pyyaml>=6.0",
        "tqdm>=4.60",
    ],
    extras_require={
        "ros": [
            "ros-rclpy",
            "ros-ament-index-python",   # resolves package:// plant files in an installed package
            "ros-rmw-fastrtps-cpp",
            "ros-std-msgs",
            "ros-sensor-msgs",
            "ros-diagnostic-msgs",
            "ros-lifecycle-msgs",
            "ros-std-srvs",
            "ros-rcl-interfaces",
            "ros-builtin-interfaces",
            "ros-rosgraph-msgs",
        ],
        "test": [
            "pytest>=7,<9",
            "cvxpy>=1.4",
            "clarabel>=0.7",
            "cvxpylayers>=0.1.6",
            "hypothesis>=6",
            "ruff>=0.6",   # the linter the test command runs (configured in pyproject.toml)
        ],
    },
    zip_safe=True,
    maintainer="scpo_ros maintainers",
    maintainer_email="scpo-ros@example.com",
    description="Safe continual learning for ROS 2: SCPO weight-space projection, action-projection safeguard, C-TRPO",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "scpo-ros = scpo_ros.cli:main",
            "plant_sim = scpo_ros.nodes.plant_sim:main",
            "expert = scpo_ros.nodes.expert:main",
            "learner = scpo_ros.nodes.learner:main",
            "scpo_safety_node = scpo_ros.nodes.scpo_safety_node:main",
            "bag_recorder = scpo_ros.nodes.bag_recorder:main",
            "action_safeguard = scpo_ros.nodes.action_safeguard:main",
        ],
        # model classes of nonlinear plants (`model: NAME` in a plant file, docs/plants.md);
        # another package registers its own robot's class in the same group
        "scpo_ros.plants": [
            "pendulum = scpo_ros.dynamics:Pendulum",
        ],
    },
)
