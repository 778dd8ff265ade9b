"""The SCPO graph of the double integrator: ``scpo.launch.py`` with ``plant:=double_integrator``
(``dof:=2``: ``double_integrator_2axis``). Every other argument is passed on.

    ros2 launch scpo_ros scpo_double_integrator.launch.py [dof:=1] [malicious:=true] [record:=true] ...
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource

PLANTS = {"1": "double_integrator", "2": "double_integrator_2axis"}


def _include(context):
    dof = context.launch_configurations["dof"]
    if dof not in PLANTS:
        raise RuntimeError(f"dof:={dof}: the shipped double integrators have 1 or 2 axes (plant:=FILE for others)")
    passed = {k: v for k, v in context.launch_configurations.items() if k != "dof"}
    share = get_package_share_directory("scpo_ros")
    return [IncludeLaunchDescription(PythonLaunchDescriptionSource(os.path.join(share, "launch", "scpo.launch.py")),
                                     launch_arguments={**passed, "plant": PLANTS[dof]}.items())]


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("dof", default_value="1", description="double-integrator axes (1 or 2)"),
        OpaqueFunction(function=_include),
    ])
