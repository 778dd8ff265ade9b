"""SCPO and the action-projection safeguard side by side, on identical simulators.

Two namespaces, the same (malicious) expert in both:

- ``/scpo``: the graph of ``scpo.launch.py``: plant_sim,
  expert, learner, scpo_safety_node (which drives the sim's ``cmd``).
- ``/safeguard``: plant_sim, expert, action_safeguard. The expert is the
  policy here: the safeguard takes ``expert_action`` as its raw action (remapped
  ``raw_action:=expert_action``) and its projection drives the sim's ``cmd``, so every
  unsafe demonstration reaches the plant only through the projection (SE-RL).

Parameters: one copy of ``params_file`` (default ``config/scpo.yaml``)
with the ``action_safeguard`` section of ``safeguard_params`` (default
``config/safeguard.yaml``) and the launch arguments merged in
(``scpo_ros.graph.compare_params_file``), not passed as ``-p``/dict overrides, which rcl
would apply *under* the file's node sections. Both namespaces read the same sections
(``/**/expert`` ...), so both simulators and both experts are identical by construction,
and the simulator's ``plant_file`` (``plant:=NAME|FILE``) is copied into the safeguard's section, so its
invariant set is computed for the plant it guards. Each simulator waits until its
subscribers (and the recorder) are matched before its first step.

With ``record:=true`` one ``bag_recorder`` (no namespace) writes both namespaces into one
bag; ``scpo-ros analyze BAG`` prints one table with a column per pipeline. As in
``scpo-ros demo --compare``, each simulator then starts only once the recorder has matched
the publishers of the topics its first state triggers, so the bag holds both runs from
their first command; if the recorder exits before that, the launch shuts down.
``scpo-ros demo --compare`` starts the same processes from the same files without ROS
tooling.

    ros2 launch scpo_ros compare_scpo_vs_safeguard.launch.py [plant:=double_integrator] \
        malicious:=true record:=true bag:=runs/compare
"""
import os
import tempfile

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch_ros.actions import Node


def _truthy(text: str) -> bool:
    return text.lower() in ("true", "1", "yes")


def _nodes(context):
    from scpo_ros import graph as g
    from scpo_ros.ros.launch_actions import start_after_recorder

    get = lambda name: context.launch_configurations[name]  # noqa: E731
    plant_file = g.plant_file_of(get("plant"))
    record = _truthy(get("record"))
    if record and os.path.exists(get("bag")):
        raise RuntimeError(f"bag directory {get('bag')} exists: remove it or pass another bag:=DIR")
    names = {name for nodes in g.COMPARE_PIPELINES.values() for name in nodes}
    overrides = {name: {"plant_file": plant_file} for name in names if name != g.RECORDER}
    overrides["expert"]["malicious"] = _truthy(get("malicious"))
    overrides[g.SIMULATOR].update({"wait_for_subscribers": g.state_subscribers(g.SCPO_PIPELINE, record)})
    overrides[g.RECORDER] = {"output": get("bag"), "topics": g.compare_recorded_topics()}
    tmp = tempfile.mkdtemp(prefix="scpo_compare_")
    params = g.compare_params_file(get("params_file"), get("safeguard_params"), overrides,
                                   os.path.join(tmp, "params.yaml"))
    # the safeguard namespace's simulator has no learner among its subscribers
    params_safeguard = g.merged_params_file(
        params, {g.SIMULATOR: {"wait_for_subscribers": g.state_subscribers(g.SAFEGUARD_PIPELINE, record)}},
        os.path.join(tmp, "params_safeguard.yaml"))
    actions, simulators = [], {}
    for ns, nodes in g.COMPARE_PIPELINES.items():
        for name in nodes:
            node = Node(package="scpo_ros", executable=name, name=name, namespace=ns,
                        parameters=[params_safeguard if ns == "safeguard" else params],
                        remappings=list(g.SAFEGUARD_REMAPS) if name == "action_safeguard" else [],
                        output="screen", emulate_tty=True)
            if record and name == g.SIMULATOR:
                simulators[ns] = node
            else:
                actions.append(node)
    if not record:
        return actions
    bag_recorder = Node(package="scpo_ros", executable=g.RECORDER, name=g.RECORDER, parameters=[params],
                        output="screen", emulate_tty=True)
    handlers = []
    for ns, sim in simulators.items():
        handlers += start_after_recorder(bag_recorder, [f"/{ns}/{t}" for t in g.state_answers(g.COMPARE_PIPELINES[ns])],
                                         [sim], f"/{ns}/{g.SIMULATOR}")
    return handlers + [bag_recorder] + actions


def generate_launch_description():
    from scpo_ros.ros.launch_actions import graph_arguments

    share = get_package_share_directory("scpo_ros")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "scpo.yaml"),
                              description="parameters of sim, expert, learner and SCPO node (both namespaces)"),
        DeclareLaunchArgument("safeguard_params", default_value=os.path.join(share, "config", "safeguard.yaml"),
                              description="action_safeguard section (its plant comes from the simulator's values)"),
        *graph_arguments("record both namespaces into one bag", "runs/compare"),
        OpaqueFunction(function=_nodes),
    ])
