"""State -> command latency of the SCPO safety node vs a bare relay node.

Same messages, same process layout: this process (the driver) publishes
``sensor_msgs/JointState`` at ``--rate`` Hz and times each ``std_msgs/Float64MultiArray``
command coming back (round trip: two DDS hops plus the node). The node under test runs
in its own process:
- ``relay``: subscribes the state, publishes its positions as the command (nothing else);
- ``safety``: ``scpo_safety_node`` (EventsExecutor, certified MLP + backup per state) while
  the driver keeps its SCPO worker busy with proposals (``--proposal-rate`` Hz), so an
  update is running during most control steps;
- ``safety_idle`` (``--idle``): the safety node without proposals.

Printed: median / p99 round trip per node, the ratio to the relay, commands missing
(a state with no command before the next state), SCPO updates done during the run, and
the control-callback compute time the safety node measured itself.

    python bench/bench_latency.py [--rate 100] [--count 1000] [--idle] [--json PATH]

Timings on a shared 2-core machine vary ±30 % between runs: compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def relay_main() -> int:
    """The bare relay node (run as ``bench_latency.py --relay-node``)."""
    from rclpy.node import Node
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray

    from scpo_ros.ros_common import CONTROL_QOS, run_node

    class Relay(Node):
        def __init__(self):
            super().__init__("relay")
            self.pub = self.create_publisher(Float64MultiArray, "cmd", CONTROL_QOS)
            self.create_subscription(JointState, "joint_states", self.cb, CONTROL_QOS)
            self.get_logger().info("relay ready")

        def cb(self, msg):
            self.pub.publish(Float64MultiArray(data=list(msg.position)))

    return run_node(Relay)


def start_node(kind: str, tmp: Path) -> subprocess.Popen:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    if kind == "relay":
        cmd = [sys.executable, __file__, "--relay-node"]
    else:
        from scpo_ros.demo import merged_params_file
        params = merged_params_file(REPO / "config" / "scpo_double_integrator.yaml",
                                    {"scpo_safety_node": {"state_timeout": 1.0}}, tmp / "params.yaml")
        cmd = [sys.executable, "-m", "scpo_ros.nodes.scpo_safety_node", "--ros-args", "--params-file", params]
    log = open(tmp / f"{kind}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_node(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(kind: str, rate: float, count: int, proposal_rate: float, tmp: Path) -> dict:
    import rclpy
    from rclpy.node import Node
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray, String

    from scpo_ros.policy import MLPLayout
    from scpo_ros.ros_common import CONTROL_QOS, EVENT_QOS, make_executor, weights_to_msg
    from scpo_ros.scpo import backup_weights

    proc = start_node("relay" if kind == "relay" else "safety", tmp)
    rclpy.init()
    node = Node(f"bench_driver_{kind}")
    ex = make_executor("events")
    ex.add_node(node)
    state_pub = node.create_publisher(JointState, "joint_states", CONTROL_QOS)
    weights_pub = node.create_publisher(Float64MultiArray, "proposed_weights", EVENT_QOS)
    layout = MLPLayout(3, 1, (32, 32))
    theta0 = backup_weights(layout).astype(float)
    rng = np.random.default_rng(0)
    sent_at = [0.0]
    waiting = [False]
    latencies, missed, decisions = [], [0], []

    def on_cmd(_msg):
        if waiting[0]:
            latencies.append(time.perf_counter() - sent_at[0])
            waiting[0] = False

    node.create_subscription(Float64MultiArray, "cmd", on_cmd, CONTROL_QOS)
    node.create_subscription(String, "scpo_decision", lambda m: decisions.append(json.loads(m.data)), EVENT_QOS)
    msg = JointState(name=["axis_0"], position=[0.1], velocity=[0.0])

    def send():
        if waiting[0]:
            missed[0] += 1          # the previous state got no command within one period
        msg.position = [float(rng.uniform(-0.5, 0.5))]
        msg.velocity = [float(rng.uniform(-0.1, 0.1))]
        msg.header.stamp = node.get_clock().now().to_msg()
        waiting[0] = True
        sent_at[0] = time.perf_counter()
        state_pub.publish(msg)

    try:
        # warm up until commands come back (node started, discovery done)
        deadline = time.monotonic() + 120.0
        while not latencies and time.monotonic() < deadline:
            send()
            t_end = time.monotonic() + 0.1
            while time.monotonic() < t_end and not latencies:
                ex.spin_once(timeout_sec=0.01)
        if not latencies:
            raise RuntimeError(f"{kind}: no command came back (see {tmp})")
        latencies.clear()
        missed[0] = 0
        waiting[0] = False
        if kind == "safety":
            # wait for the worker's first certification, then keep it busy
            while not decisions and time.monotonic() < deadline:
                ex.spin_once(timeout_sec=0.05)
            propose_every = 1.0 / proposal_rate
            next_prop = time.perf_counter()
        n_dec0 = len(decisions)
        period = 1.0 / rate
        t_next = time.perf_counter()
        for _ in range(count):
            send()
            t_next += period
            if kind == "safety" and time.perf_counter() >= next_prop:
                weights_pub.publish(weights_to_msg(theta0 + 0.02 * rng.standard_normal(theta0.size),
                                                   layout.fingerprint))
                next_prop += propose_every
            while True:
                left = t_next - time.perf_counter()
                if left <= 0:
                    break
                ex.spin_once(timeout_sec=min(left, 0.002))
        end = time.monotonic() + 0.5
        while waiting[0] and time.monotonic() < end:
            ex.spin_once(timeout_sec=0.01)
        updates = len(decisions) - n_dec0
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        stop_node(proc)
    lat = 1e3 * np.asarray(latencies)
    out = {"node": kind, "n": int(lat.size), "median_ms": float(np.median(lat)),
           "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()),
           "missed": int(count - lat.size)}
    if kind != "relay":
        out["scpo_updates_during_run"] = int(updates)
        for line in (tmp / "safety.log").read_text().splitlines():
            if line.startswith("SUMMARY "):
                s = json.loads(line[8:])
                out["compute_us"] = s["compute_us"]
                out["updates"] = s["updates"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=100.0, help="state rate [Hz]")
    ap.add_argument("--count", type=int, default=1000, help="states per node")
    ap.add_argument("--proposal-rate", type=float, default=4.0, help="proposals per second to the safety node")
    ap.add_argument("--idle", action="store_true", help="also measure the safety node without SCPO updates")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--relay-node", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.relay_node:
        return relay_main()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_latency_") as tmp:
        runs = [("relay", 0.0), ("safety", args.proposal_rate)]
        if args.idle:
            runs.append(("safety_idle", 0.0))
        for kind, prop in runs:
            sub = Path(tmp) / kind
            sub.mkdir()
            results[kind] = measure("safety" if kind.startswith("safety") else "relay", args.rate, args.count,
                                    prop if prop > 0 else 1e-9, sub)
            if kind == "safety_idle":
                results[kind]["node"] = "safety_idle"
    relay = results["relay"]
    print(f"state -> command round trip, {args.count} states at {args.rate:g} Hz "
          f"(driver and node in separate processes, EventsExecutor)")
    print(f"{'node':<14}{'median ms':>10}{'p99 ms':>9}{'ratio med':>10}{'ratio p99':>10}{'missed':>8}{'updates':>9}"
          f"{'compute us (med/p99)':>22}")
    for r in results.values():
        comp = r.get("compute_us") or {}
        comp_s = f"{comp['median']:.1f}/{comp['p99']:.1f}" if comp.get("median") is not None else "-"
        print(f"{r['node']:<14}{r['median_ms']:>10.3f}{r['p99_ms']:>9.3f}{r['median_ms'] / relay['median_ms']:>10.2f}"
              f"{r['p99_ms'] / relay['p99_ms']:>10.2f}{r['missed']:>8}{r.get('scpo_updates_during_run', '-'):>9}"
              f"{comp_s:>22}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
