"""SCPO and the action-projection safeguard side by side, on identical simulators.

Two namespaces, the same (malicious) expert in both:

- ``/scpo``: the SCPO graph of ``scpo_double_integrator.launch.py`` (sim, expert, learner,
  scpo_safety_node), included with ``namespace:=scpo``.
- ``/safeguard``: sim + expert + ``action_safeguard``. The expert's action is the raw
  action (``expert_action`` -> ``raw_action``); the safeguard's safe command drives the
  sim (``cmd``). The expert is the "policy" here, so SE-RL's claim is tested directly:
  every unsafe action is projected before it reaches the plant.

Both sims read the same parameter file, so both plants start identically; the
safeguard's plant limits come from ``safeguard_params`` and must match the sim's.
With ``record:=true`` each namespace records its own bag (``<bag_dir>/scpo``,
``<bag_dir>/safeguard``); ``scpo-ros analyze`` compares them.

    ros2 launch scpo_ros compare_scpo_vs_safeguard.launch.py malicious:=true record:=true bag_dir:=runs/compare
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, GroupAction, IncludeLaunchDescription
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node, PushRosNamespace


def generate_launch_description():
    share = get_package_share_directory("scpo_ros")
    params_file = LaunchConfiguration("params_file")
    safeguard_params = LaunchConfiguration("safeguard_params")
    malicious = LaunchConfiguration("malicious")
    record = LaunchConfiguration("record")
    bag_dir = LaunchConfiguration("bag_dir")
    dof = LaunchConfiguration("dof")

    args = [
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "scpo_double_integrator.yaml"),
                              description="parameters of sim, expert, learner and SCPO node (both namespaces)"),
        DeclareLaunchArgument("safeguard_params", default_value=os.path.join(share, "config", "safeguard.yaml"),
                              description="action_safeguard parameters (plant limits must match the sim)"),
        DeclareLaunchArgument("malicious", default_value="true", description="malicious expert phases on/off"),
        DeclareLaunchArgument("record", default_value="false", description="record one bag per namespace"),
        DeclareLaunchArgument("bag_dir", default_value="runs/compare", description="bags go to BAG_DIR/{scpo,safeguard}"),
        DeclareLaunchArgument("dof", default_value="1", description="double-integrator axes (1 or 2)"),
    ]

    scpo = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(share, "launch", "scpo_double_integrator.launch.py")),
        launch_arguments={"namespace": "scpo", "params_file": params_file, "malicious": malicious,
                          "record": record, "bag": PathJoinSubstitution([bag_dir, "scpo"]),
                          "dof": dof}.items())

    dof_override = {"dof": dof}
    safeguard = GroupAction([
        PushRosNamespace("safeguard"),
        Node(package="scpo_ros", executable="double_integrator_sim", name="double_integrator_sim",
             parameters=[params_file, dof_override], output="screen"),
        Node(package="scpo_ros", executable="expert", name="expert",
             parameters=[params_file, {"malicious": malicious}, dof_override],
             remappings=[("expert_action", "raw_action")], output="screen"),
        Node(package="scpo_ros", executable="action_safeguard", name="action_safeguard",
             parameters=[safeguard_params, dof_override], output="screen"),
        Node(package="scpo_ros", executable="bag_recorder", name="bag_recorder", condition=IfCondition(record),
             parameters=[params_file, {"output": PathJoinSubstitution([bag_dir, "safeguard"]),
                                       "topics": ["joint_states", "raw_action", "cmd", "intervention",
                                                  "violations", "/diagnostics"]}],
             output="screen"),
    ])
    return LaunchDescription(args + [scpo, safeguard])
