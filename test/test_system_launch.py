"""launch_testing test of launch/scpo_double_integrator.launch.py (runs where launch_ros exists).

Starts the graph as ``ros2 launch`` would, with every launch argument the file declares
set: a malicious expert, a namespace, recording into a fresh bag, and a ``params_file``
(the package's YAML with a short malicious period, 2 s of every 4 s, so that a short run
sees a whole malicious phase). While it runs, a probe checks that commands arrive on the
namespaced topic (and none on the root one), that the safety node accepts SCPO updates,
that a malicious phase passes, and that the simulator reports no constraint violation.
After shutdown: every node of the graph ran and exited with 0 (SIGINT handled), printed
its SUMMARY (simulator: zero violations), the simulator waited for all its subscribers
before its first step, and the bag was closed and reads back with zero violations.

Run with ``pytest test/test_system_launch.py`` (pytest < 9 with the launch_testing plugin) or
``launch_test test/test_system_launch.py``.
"""
import json
import os
import re
import shutil
import tempfile
import time
import unittest
from pathlib import Path

import pytest

pytest.importorskip("launch_ros")
pytest.importorskip("launch_testing")

import launch  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
import rclpy  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from std_msgs.msg import Bool, Float64MultiArray, String  # noqa: E402

from scpo_ros.graph import SIMULATOR, merged_params_file  # noqa: E402

pytestmark = pytest.mark.slow   # the whole graph, started by launch

REPO = Path(__file__).resolve().parent.parent
LAUNCH_FILE = REPO / "launch" / "scpo.launch.py"
NAMESPACE = "launch_test"
NODES = {SIMULATOR, "expert", "learner", "scpo_safety_node", "bag_recorder"}
TIMEOUT = float(os.environ.get("SCPO_LAUNCH_TEST_TIMEOUT", "120"))


@pytest.mark.launch_test
def generate_test_description():
    tmp = Path(tempfile.mkdtemp(prefix="scpo_launch_test_"))
    params = merged_params_file(REPO / "config" / "scpo.yaml",
                                {"expert": {"malicious_period_s": 4.0, "malicious_duty": 0.5}},
                                tmp / "params.yaml")
    bag = tmp / "bag"
    graph = launch.actions.IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
        launch_arguments={"malicious": "true", "namespace": NAMESPACE, "record": "true", "bag": str(bag),
                          "plant": "double_integrator", "params_file": params}.items())
    return launch.LaunchDescription([graph, launch_testing.actions.ReadyToTest()]), {"bag": bag, "tmp": tmp}


class TestGraphRuns(unittest.TestCase):
    def test_commands_decisions_and_a_malicious_phase(self, proc_output):
        context = rclpy.Context()
        rclpy.init(context=context)
        node = rclpy.create_node("launch_test_probe", context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        cmds, root_cmds, decisions, violations, malicious = [], [], [], [], []
        node.create_subscription(Float64MultiArray, f"/{NAMESPACE}/cmd", cmds.append, 100)
        node.create_subscription(Float64MultiArray, "/cmd", root_cmds.append, 100)
        node.create_subscription(String, f"/{NAMESPACE}/scpo_decision",
                                 lambda m: decisions.append(json.loads(m.data)), 100)
        node.create_subscription(String, f"/{NAMESPACE}/constraint_violation", violations.append, 100)
        node.create_subscription(Bool, f"/{NAMESPACE}/malicious", lambda m: malicious.append(m.data), 100)

        def accepted():
            return [d for d in decisions if d.get("kind") == "proposal" and d.get("status") == "accepted"]

        def malicious_phase_passed():
            return any(a and not b for a, b in zip(malicious, malicious[1:], strict=False))

        try:
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and not (len(cmds) > 100 and accepted() and malicious_phase_passed()):
                executor.spin_once(timeout_sec=0.1)
            self.assertGreater(len(cmds), 100, "commands on the namespaced cmd topic")
            self.assertTrue(all(len(m.data) == 1 for m in cmds), "one command per input (the double integrator's one)")
            self.assertEqual(root_cmds, [], "nothing on /cmd: every node is in the namespace")
            self.assertTrue(accepted(), f"no accepted SCPO update among {len(decisions)} decisions")
            self.assertTrue(malicious_phase_passed(), "no whole malicious phase seen")
            self.assertEqual(violations, [])
        finally:
            executor.shutdown()
            node.destroy_node()
            rclpy.shutdown(context=context)
        # the simulator waited for its state subscribers (safety node, expert, learner, recorder)
        proc_output.assertWaitFor("subscribers matched: starting", process=SIMULATOR, timeout=5)


def _summaries(proc_output) -> dict[str, dict]:
    """Process name without the ``-N`` suffix -> its SUMMARY line's JSON."""
    out = {}
    for event in proc_output:
        for line in event.text.decode(errors="replace").splitlines():
            match = re.search(r"SUMMARY (\{.*\})", line)
            if match:
                out[event.process_name.rsplit("-", 1)[0]] = json.loads(match.group(1))
    return out


@launch_testing.post_shutdown_test()
class TestAfterShutdown(unittest.TestCase):
    def test_exit_codes(self, proc_info):
        # SIGINT must end every node with 0 (run_node handles the signal)
        self.assertEqual({name.rsplit("-", 1)[0] for name in proc_info.process_names()}, NODES)
        launch_testing.asserts.assertExitCodes(proc_info)

    def test_simulator_waited_for_its_subscribers(self, proc_output):
        text = "".join(e.text.decode(errors="replace") for e in proc_output
                       if e.process_name.startswith(SIMULATOR))
        match = re.search(r"(\d+) subscribers matched: starting", text)
        self.assertIsNotNone(match, "the simulator did not wait for its subscribers (wait_for_subscribers 0?)")
        self.assertGreaterEqual(int(match.group(1)), 4)

    def test_summaries(self, proc_output):
        summaries = _summaries(proc_output)
        self.assertEqual(set(summaries), NODES)
        sim = summaries[SIMULATOR]
        self.assertEqual(sim["constraint_violations"], 0)
        self.assertGreater(sim["steps"], 50)
        self.assertGreater(summaries["expert"]["malicious_demonstrations"], 0)
        safety = summaries["scpo_safety_node"]
        self.assertGreater(safety["updates"]["accepted"], 0)
        self.assertEqual(safety["worker_errors"], 0)
        self.assertEqual(summaries["learner"]["update_errors"], 0)
        # the simulator started once the recorder had matched the graph's publishers, so the bag
        # holds every state and command but the last few, sent while the recorder shut down
        counts = summaries["bag_recorder"]["counts"]
        self.assertGreaterEqual(counts[f"/{NAMESPACE}/joint_states"], sim["states_published"] - 3)
        self.assertGreaterEqual(counts[f"/{NAMESPACE}/cmd"], safety["control_steps"] - 3)
        self.assertGreater(counts[f"/{NAMESPACE}/cmd"], 50)

    def test_bag(self, bag, tmp):
        from scpo_ros.analysis import analyze

        try:
            self.assertTrue((bag / "metadata.yaml").exists(), "the recorder did not close the bag")
            metrics, _ = analyze(bag)
            self.assertEqual(metrics["constraint_violations"], 0)
            self.assertEqual(metrics["constraint_violations_from_states"], 0)
            self.assertEqual(metrics["limits"]["source"], "plant topic")
            self.assertGreater(metrics["control_steps"], 50)
            self.assertGreater(metrics["updates"].get("accepted", 0), 0)
            self.assertGreater(metrics["malicious_fraction"], 0.0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
