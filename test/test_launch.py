"""launch_testing test of launch/scpo_double_integrator.launch.py (runs where launch_ros exists).

Starts the graph with the malicious expert, waits until commands reach the simulator
and the safety node reports an SCPO decision, then checks that every process exits
with code 0 on shutdown (SIGINT handled) and that no constraint was violated.
"""
import os
import time
import unittest
from pathlib import Path

import pytest

launch_ros = pytest.importorskip("launch_ros")
launch_testing = pytest.importorskip("launch_testing")

import launch  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
import rclpy  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from std_msgs.msg import Float64MultiArray, String  # noqa: E402

LAUNCH_FILE = Path(__file__).resolve().parent.parent / "launch" / "scpo_double_integrator.launch.py"


@pytest.mark.launch_test
def generate_test_description():
    graph = launch.actions.IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
        launch_arguments={"malicious": "true", "namespace": "launch_test"}.items())
    return launch.LaunchDescription([graph, launch_testing.actions.ReadyToTest()])


class TestGraphRuns(unittest.TestCase):
    def test_commands_and_decisions(self, proc_output):
        rclpy.init()
        node = rclpy.create_node("launch_test_probe")
        cmds, decisions, violations = [], [], []
        node.create_subscription(Float64MultiArray, "/launch_test/cmd", cmds.append, 10)
        node.create_subscription(String, "/launch_test/scpo_decision", decisions.append, 10)
        node.create_subscription(String, "/launch_test/constraint_violation", violations.append, 10)
        try:
            deadline = time.monotonic() + float(os.environ.get("SCPO_LAUNCH_TEST_TIMEOUT", "120"))
            while time.monotonic() < deadline and not (len(cmds) > 20 and decisions):
                rclpy.spin_once(node, timeout_sec=0.1)
            self.assertGreater(len(cmds), 20)
            self.assertTrue(decisions)
            self.assertEqual(violations, [])
        finally:
            node.destroy_node()
            rclpy.shutdown()


@launch_testing.post_shutdown_test()
class TestExitCodes(unittest.TestCase):
    def test_exit_codes(self, proc_info):
        # SIGINT must end every node with 0 (run_node catches KeyboardInterrupt/ExternalShutdownException)
        launch_testing.asserts.assertExitCodes(proc_info)
