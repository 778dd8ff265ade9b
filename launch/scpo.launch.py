"""The SCPO graph of any plant: simulator, (malicious) expert, learner, SCPO safety node,
optionally a bag recorder.

    ros2 launch scpo_ros scpo.launch.py [plant:=double_integrator] [malicious:=true] [record:=true] \\
        [bag:=runs/scpo_bag] [namespace:=robot1] [params_file:=/path/to.yaml]

``plant``: a shipped plant's name (``config/plants/NAME.yaml``), a plant file's path or a
``package://`` URL; it sets ``plant_file`` of every node (``graph.plant_file_of``).
``scpo_double_integrator.launch.py`` is this file with ``plant:=double_integrator``.

Every parameter comes from ``params_file`` (default: the package's
``config/scpo.yaml``); the launch arguments are merged into a copy of
it (``scpo_ros.graph.merged_params_file``), not passed as ``-p``/dict overrides, which rcl
would apply *under* the file's node sections. ``scpo-ros demo`` starts the same nodes
from the same file without ROS tooling.

The safety node configures and activates itself (``autostart: true``); with
``autostart: false`` a lifecycle manager (or ``ros2 lifecycle set``) drives it.

As in ``scpo-ros demo``, the simulator's first step waits until the safety node, the
expert, the learner (and the recorder) subscribe to its states; with ``record:=true`` the
simulator starts only once the recorder has matched the publishers of the topics the first
state triggers (``cmd``, ``expert_action``, ``reference``, ``malicious``), so the bag holds
the run from its first command. If the recorder exits before that (the bag directory
exists, say), the launch shuts down instead of running without its bag.
"""
import os
import tempfile

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch_ros.actions import Node


def _nodes(context):
    from scpo_ros import graph as g
    from scpo_ros.ros.launch_actions import start_after_recorder

    get = lambda name: context.launch_configurations[name]  # noqa: E731
    namespace = get("namespace").strip("/")
    plant_file = g.plant_file_of(get("plant"))
    malicious = get("malicious").lower() in ("true", "1", "yes")
    record = get("record").lower() in ("true", "1", "yes")
    overrides = {name: {"plant_file": plant_file} for name in g.SCPO_PIPELINE}
    overrides["expert"]["malicious"] = malicious
    # the simulator's first step waits for its subscribers (safety node, expert, learner, the
    # recorder), as in ``scpo-ros demo``: none of them, and not the bag, misses the first state
    overrides[g.SIMULATOR].update({"wait_for_subscribers": g.state_subscribers(g.SCPO_PIPELINE, record)})
    if record and os.path.exists(get("bag")):
        raise RuntimeError(f"bag directory {get('bag')} exists: remove it or pass another bag:=DIR")
    overrides[g.RECORDER] = {"output": get("bag")}
    out = tempfile.NamedTemporaryFile(prefix="scpo_params_", suffix=".yaml", delete=False).name
    params = g.merged_params_file(get("params_file"), overrides, out)
    names = g.SCPO_PIPELINE + ((g.RECORDER,) if record else ())
    nodes = {name: Node(package="scpo_ros", executable=name, name=name, namespace=namespace, parameters=[params],
                        output="screen", emulate_tty=True) for name in names}
    if not record:
        return list(nodes.values())
    sim, recorder = nodes.pop(g.SIMULATOR), nodes.pop(g.RECORDER)
    prefix = f"/{namespace}" if namespace else ""
    return start_after_recorder(recorder, [f"{prefix}/{t}" for t in g.state_answers(g.SCPO_PIPELINE)], [sim],
                                g.SIMULATOR) + [recorder, *nodes.values()]


def generate_launch_description():
    from scpo_ros.ros.launch_actions import graph_arguments

    share = get_package_share_directory("scpo_ros")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "scpo.yaml"),
                              description="ROS parameter file of every node"),
        *graph_arguments("record a bag (MCAP) with bag_recorder", "runs/scpo_bag"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of every node"),
        OpaqueFunction(function=_nodes),
    ])
