"""Helpers for the ROS integration tests: node processes and a probe node in the test process.

Nodes under test run as their own processes (``python -m scpo_ros.nodes.<name>``), as in
the demo and the launch file; the test talks to them over DDS through ``Probe``, an rclpy
node spun by a ``SingleThreadedExecutor`` in a background thread. Every wait is a
condition with a timeout, never a fixed sleep.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from std_msgs.msg import String

from scpo_ros.graph import merged_params_file

REPO = Path(__file__).resolve().parent.parent
PARAMS = REPO / "config" / "scpo.yaml"
STARTUP_TIMEOUT = 90.0   # node processes import torch: slow on a loaded 2-core machine
TIMEOUT = 20.0


def wait_for(predicate, timeout: float = TIMEOUT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class NodeProcess:
    """One node as a subprocess with its output captured to a file."""

    def __init__(self, name: str, log_dir: Path, params_file: Path | None = None, params: dict | None = None,
                 namespace: str = ""):
        self.name = name
        self.log = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", f"scpo_ros.nodes.{name}", "--ros-args"]
        if params_file is not None:
            # -p would lose against the file's own section for this node: merge instead
            params_file = merged_params_file(params_file, {name: params or {}}, log_dir / f"{name}.params.yaml")
            cmd += ["--params-file", str(params_file)]
        else:
            for k, v in (params or {}).items():
                cmd += ["-p", f"{k}:={_ros_value(v)}"]
        if namespace:
            cmd += ["-r", f"__ns:={namespace}"]
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self._file = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._file, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._file.close()
        return self.proc.returncode

    def summary(self) -> dict:
        for line in self.text().splitlines():
            if line.startswith("SUMMARY "):
                return json.loads(line[len("SUMMARY "):].replace("NaN", "null"))
        raise AssertionError(f"{self.name} printed no SUMMARY line:\n{self.text()[-2000:]}")


def _ros_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_ros_value(x) for x in v) + "]"
    return str(v)


class SpunNode:
    """An rclpy node in its own context, spun in a background thread by ``make_executor(context)``
    (default: a ``SingleThreadedExecutor``); ``close()`` stops the thread and shuts the context down.
    ``node_kwargs`` go to ``Node`` (``namespace``, ``cli_args``)."""

    def __init__(self, name: str, make_executor=None, **node_kwargs):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = Node(name, context=self.context, **node_kwargs)
        self.executor = (make_executor or (lambda context: SingleThreadedExecutor(context=context)))(self.context)
        self.executor.add_node(self.node)
        self._stop = False
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self):
        while not self._stop and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def close(self):
        self._stop = True
        self._thread.join(timeout=5.0)
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


class Probe(SpunNode):
    """The test's own rclpy node: publishers, recorded subscriptions, service calls."""

    def __init__(self, name: str = "test_probe"):
        self.received: dict[str, list] = {}
        self._lock = threading.Lock()
        super().__init__(name)

    def record(self, msg_type, topic: str, qos=10, key: str | None = None) -> str:
        key = key or topic
        self.received[key] = []

        def cb(msg, key=key):
            with self._lock:
                self.received[key].append((time.monotonic(), msg))
        self.node.create_subscription(msg_type, topic, cb, qos)
        return key

    def messages(self, key: str, since: float = 0.0) -> list:
        with self._lock:
            return [m for t, m in self.received[key] if t >= since]

    def record_diagnostics(self):
        return self.record(DiagnosticArray, "/diagnostics", key="diagnostics")

    def statuses(self, name_part: str, since: float = 0.0) -> list:
        return [s for arr in self.messages("diagnostics", since) for s in arr.status if name_part in s.name]

    def record_json(self, topic: str, qos=10) -> str:
        return self.record(String, topic, qos)

    def json_messages(self, key: str, since: float = 0.0) -> list[dict]:
        return [json.loads(m.data) for m in self.messages(key, since)]

    def call(self, srv_type, name: str, request, timeout: float = TIMEOUT):
        client = self.node.create_client(srv_type, name)
        try:
            wait_for(lambda: client.service_is_ready(), timeout, f"service {name}")
            future = client.call_async(request)
            wait_for(future.done, timeout, f"reply of {name}")
            return future.result()
        finally:
            self.node.destroy_client(client)
