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

``--flood RATE`` (issue 9) measures the safety node alone under a proposal flood instead:
a flood *process* (not a thread of the driver: it must not steal the measuring thread)
publishes ``Float64MultiArray`` proposals at RATE Hz, half of them malformed (wrong sizes:
empty, a few doubles, half, too many, twice the layout) and half valid-size random weights
with the layout's fingerprint. Baseline: the same flood on ``proposed_weights_unused``, a
topic the node does not subscribe to. One node process, six phases of ``--count`` states
alternating baseline / flood; the driver keeps the worker busy with ``--proposal-rate``
proposals in every phase. Printed: each phase, the median of the 3 p99 values of each
side and the ratio flood p99 / baseline p99 (the acceptance of issue 9: <= 2 at 1 kHz),
and the node process's CPU time per phase (less noisy than latencies on a shared machine).

A command is credited to the oldest state still waiting (the node answers in order), so a
queueing delay of many periods shows as such. A state the node never answers (rejected as
stale, or dropped from its depth-10 queue) is ``lost`` after 1 s; until then later
commands are credited to it: with ``lost`` > 0 the latencies of a phase are upper bounds.

    python bench/bench_latency.py [--rate 100] [--count 1000] [--idle] [--flood RATE] [--json PATH]

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
from collections import deque
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def relay_main() -> int:
    """The bare relay node (run as ``bench_latency.py --relay-node``)."""
    from rclpy.node import Node
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray

    from scpo_ros.ros.qos import CONTROL_QOS
    from scpo_ros.ros.runner import run_node

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
    # this checkout's node, also when an editable install points elsewhere (a copy of an older
    # commit measures its own node: the "before" numbers of BENCHMARKS.md)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if kind == "relay":
        cmd = [sys.executable, __file__, "--relay-node"]
    else:
        from scpo_ros.graph import merged_params_file
        params = merged_params_file(REPO / "config" / "scpo.yaml",
                                    # the driver's states follow no dynamics: no model monitor
                                    {"scpo_safety_node": {"state_timeout": 1.0, "monitor_enabled": False}},
                                    tmp / "params.yaml")
        cmd = [sys.executable, "-m", "scpo_ros.nodes.scpo_safety_node", "--ros-args", "--params-file", params]
    log = open(tmp / f"{kind}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO)


def stop_node(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Driver:
    """This process's side: publishes states, times the commands, feeds proposals."""

    LOST_AFTER_S = 1.0
    """A state not answered within this is lost (the node rejected it, or DDS dropped it)."""

    def __init__(self, kind: str, rate: float, tmp: Path):
        import rclpy
        from rclpy.node import Node
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float64MultiArray, String

        from scpo_ros.policy import MLPLayout
        from scpo_ros.residual_scpo import backup_weights
        from scpo_ros.ros.qos import CONTROL_QOS, EVENT_QOS
        from scpo_ros.ros.runner import make_executor

        self.kind, self.rate, self.tmp = kind, rate, tmp
        self.proc = start_node("relay" if kind == "relay" else "safety", tmp)
        rclpy.init()
        self.node = Node(f"bench_driver_{kind}")
        self.ex = make_executor("events")
        self.ex.add_node(self.node)
        self.state_pub = self.node.create_publisher(JointState, "joint_states", CONTROL_QOS)
        self.weights_pub = self.node.create_publisher(Float64MultiArray, "proposed_weights", EVENT_QOS)
        self.layout = MLPLayout(3, 1, (32, 32))
        self.theta0 = backup_weights(self.layout).astype(float)
        self.rng = np.random.default_rng(0)
        self.sent_at = 0.0
        self.waiting = False
        self.pending: deque[float] = deque()     # send times of the states not answered yet
        self.lost = 0
        self.latencies: list[float] = []
        self.decisions: list[dict] = []
        self.node.create_subscription(Float64MultiArray, "cmd", self._on_cmd, CONTROL_QOS)
        self.node.create_subscription(String, "scpo_decision", lambda m: self.decisions.append(json.loads(m.data)),
                                      EVENT_QOS)
        self.msg = JointState(name=["axis_0"], position=[0.1], velocity=[0.0])

    def _on_cmd(self, _msg) -> None:
        # The node answers its states in order: a command belongs to the oldest state still
        # waiting (a late answer is not credited to a newer state, as a "first command since
        # the last send" would; under a flood that hid queueing delays of many periods).
        now = time.perf_counter()
        while self.pending and now - self.pending[0] > self.LOST_AFTER_S:
            self.pending.popleft()
            self.lost += 1
        if self.pending:
            self.latencies.append(now - self.pending.popleft())
        self.waiting = bool(self.pending)

    def send(self) -> None:
        self.msg.position = [float(self.rng.uniform(-0.5, 0.5))]
        self.msg.velocity = [float(self.rng.uniform(-0.1, 0.1))]
        self.msg.header.stamp = self.node.get_clock().now().to_msg()
        self.waiting = True
        self.sent_at = time.perf_counter()
        self.pending.append(self.sent_at)
        self.state_pub.publish(self.msg)

    def warm_up(self, timeout: float = 120.0) -> None:
        """Until commands come back (node started, discovery done) and, for the safety node,
        its worker's first certification is out (the worker is busy from then on)."""
        deadline = time.monotonic() + timeout
        while not self.latencies and time.monotonic() < deadline:
            self.send()
            t_end = time.monotonic() + 0.1
            while time.monotonic() < t_end and not self.latencies:
                self.ex.spin_once(timeout_sec=0.01)
        if not self.latencies:
            raise RuntimeError(f"{self.kind}: no command came back (see {self.tmp})")
        if self.kind == "safety":
            # states keep flowing (a node without states for state_timeout would switch to hold
            # commands, which are not answers); a first decision missed before discovery ends
            # the wait after 30 s
            self.keep_alive(30.0, until=lambda: bool(self.decisions))
        self.keep_alive(0.2)

    def keep_alive(self, seconds: float, until=None) -> None:
        """States at the rate, answers not recorded, for ``seconds`` or until ``until()``."""
        period = 1.0 / self.rate
        end = time.perf_counter() + seconds
        t_next = time.perf_counter()
        while time.perf_counter() < end and not (until is not None and until()):
            self.send()
            t_next += period
            while (left := t_next - time.perf_counter()) > 0:
                self.ex.spin_once(timeout_sec=min(left, 0.002))
        self.pending.clear()
        self.waiting = False

    def phase(self, count: int, proposal_rate: float) -> dict:
        """``count`` states at ``rate`` Hz: round trips (ms), missed commands, updates."""
        from scpo_ros.ros.messages import weights_to_msg

        self.keep_alive(0.05)
        self.latencies, self.lost, self.waiting = [], 0, False
        missed = 0
        n_dec0 = len(self.decisions)
        propose = self.kind == "safety" and proposal_rate > 0
        propose_every = 1.0 / proposal_rate if propose else 0.0
        next_prop = time.perf_counter()
        period = 1.0 / self.rate
        t_next = time.perf_counter()
        for _ in range(count):
            if self.waiting:
                missed += 1          # the previous state got no command within one period
            self.send()
            t_next += period
            if propose and time.perf_counter() >= next_prop:
                self.weights_pub.publish(weights_to_msg(
                    self.theta0 + 0.02 * self.rng.standard_normal(self.theta0.size), self.layout.fingerprint))
                next_prop += propose_every
            while True:
                left = t_next - time.perf_counter()
                if left <= 0:
                    break
                self.ex.spin_once(timeout_sec=min(left, 0.002))
        end = time.monotonic() + self.LOST_AFTER_S
        while self.pending and time.monotonic() < end:
            self.ex.spin_once(timeout_sec=0.01)
        lat = 1e3 * np.asarray(self.latencies)
        # "missed": states without a command within one period (late or never answered)
        return {"n": int(lat.size), "median_ms": float(np.median(lat)), "p99_ms": float(np.percentile(lat, 99)),
                "mean_ms": float(lat.mean()), "max_ms": float(lat.max()), "missed": missed,
                "lost": int(count - lat.size), "scpo_updates_during_run": len(self.decisions) - n_dec0}

    def close(self) -> dict | None:
        """Stop everything; the node's SUMMARY line (safety node) or None."""
        import rclpy
        try:
            self.node.destroy_node()
            rclpy.try_shutdown()
        finally:
            stop_node(self.proc)
        log = self.tmp / "safety.log"
        if self.kind == "safety" and log.exists():
            for line in log.read_text().splitlines():
                if line.startswith("SUMMARY "):
                    return json.loads(line[8:].replace("NaN", "null"))
        return None


def measure(kind: str, rate: float, count: int, proposal_rate: float, tmp: Path) -> dict:
    driver = Driver(kind, rate, tmp)
    summary = None
    try:
        driver.warm_up()
        res = driver.phase(count, proposal_rate)
    finally:
        summary = driver.close()
    out = {"node": kind, **{k: res[k] for k in ("n", "median_ms", "p99_ms", "mean_ms", "missed")}}
    if kind != "relay":
        out["scpo_updates_during_run"] = res["scpo_updates_during_run"]
        if summary is not None:
            out["compute_us"] = summary["compute_us"]
            out["updates"] = summary["updates"]
    return out


# --------------------------------------------------------------------------- the flood

FLOOD_UNUSED_TOPIC = "proposed_weights_unused"


def flood_main(argv: list[str]) -> int:
    """The flood process (``bench_latency.py --flood-node RATE TOPIC N FINGERPRINT``).

    Messages are serialised once, up front, and published as bytes: the flood's own cost
    per message is a DDS write, so RATE holds on a loaded 2-core machine. Each tick
    publishes what is due (catch-up), malformed and valid alternating. Prints ``FLOODING``
    once publishing and ``SENT <n> <seconds>`` at SIGINT/SIGTERM.
    """
    import rclpy
    from rclpy.node import Node
    from rclpy.serialization import serialize_message
    from rclpy.signals import SignalHandlerOptions
    from std_msgs.msg import Float64MultiArray, MultiArrayDimension

    from scpo_ros.ros.qos import EVENT_QOS

    rate, topic, n, fingerprint = float(argv[0]), argv[1], int(argv[2]), argv[3]
    stop = [False]
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.__setitem__(0, True))
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = Node("bench_flood")
    pub = node.create_publisher(Float64MultiArray, topic, EVENT_QOS)
    rng = np.random.default_rng(1)

    def encoded(size: int, label: str) -> bytes:
        msg = Float64MultiArray(data=rng.standard_normal(size).tolist())
        msg.layout.dim = [MultiArrayDimension(label=label, size=size, stride=size)]
        return serialize_message(msg)

    wrong_sizes = [0, 3, n // 2, n + 64, 2 * n]
    malformed = [encoded(wrong_sizes[i % len(wrong_sizes)], fingerprint) for i in range(16)]
    valid = [encoded(n, fingerprint) for _ in range(16)]
    pool = [m for pair in zip(malformed, valid) for m in pair]      # half malformed, half valid
    sent, period = 0, 1.0 / rate
    print("FLOODING", flush=True)
    t0 = time.perf_counter()
    while not stop[0]:
        due = int((time.perf_counter() - t0) / period) + 1
        while sent < due:
            pub.publish(pool[sent % len(pool)])
            sent += 1
        time.sleep(max(0.0, t0 + due * period - time.perf_counter()))
    print(f"SENT {sent} {time.perf_counter() - t0:.3f}", flush=True)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def start_flood(rate: float, topic: str, n: int, fingerprint: str, driver: Driver,
                timeout: float = 60.0) -> subprocess.Popen:
    """The flood process, returned once it publishes (the driver's states flow meanwhile)."""
    import select
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, __file__, "--flood-node", str(rate), topic, str(n), fingerprint],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0)[0]:
            if proc.stdout.readline().startswith("FLOODING"):
                return proc
        else:
            driver.keep_alive(0.05)
    proc.kill()
    raise RuntimeError(f"the flood process did not start: {proc.stdout.read()}")


def stop_flood(proc: subprocess.Popen) -> float:
    """Stop the flood; the rate it achieved [Hz]."""
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    for line in out.splitlines():
        if line.startswith("SENT "):
            sent, seconds = line.split()[1:3]
            return int(sent) / max(float(seconds), 1e-9)
    return float("nan")


def process_cpu_s(pid: int) -> float:
    """CPU time (user + system, s) of a process so far (its threads included, not its children:
    the SCPO worker process is not counted): what the flood costs the node, less noisy than
    latencies on a shared machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def measure_flood(rate: float, count: int, proposal_rate: float, flood_rate: float, tmp: Path,
                  repeats: int = 3, settle_s: float = 1.0) -> dict:
    """Alternating baseline (flood on an unused topic) and flood phases with one node process."""
    driver = Driver("safety", rate, tmp)
    phases = []
    summary = None
    try:
        driver.warm_up()
        n, fingerprint = driver.layout.size, driver.layout.fingerprint
        for i in range(repeats):
            for side, topic in (("baseline", FLOOD_UNUSED_TOPIC), ("flood", "proposed_weights")):
                flood = start_flood(flood_rate, topic, n, fingerprint, driver)
                try:
                    driver.keep_alive(settle_s)     # discovery and the node's backlog, if any, set in
                    cpu0 = process_cpu_s(driver.proc.pid)
                    res = driver.phase(count, proposal_rate)
                    cpu = process_cpu_s(driver.proc.pid) - cpu0
                finally:
                    res_rate = stop_flood(flood)
                res.update(side=side, repeat=i, topic=topic, flood_rate_hz=res_rate, node_cpu_s=cpu)
                phases.append(res)
                print(f"  {side:<9} {i}: median {res['median_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  "
                      f"max {res['max_ms']:.1f} ms  missed {res['missed']}  lost {res['lost']}  "
                      f"flood {res_rate:.0f} Hz  node cpu {cpu:.2f} s", flush=True)
    finally:
        summary = driver.close()
    out = {"flood_rate": flood_rate, "count": count, "rate": rate, "phases": phases}
    for side in ("baseline", "flood"):
        rs = [p for p in phases if p["side"] == side]
        out[side] = {"p99_ms_median": float(np.median([p["p99_ms"] for p in rs])),
                     "median_ms_median": float(np.median([p["median_ms"] for p in rs])),
                     "max_ms": float(max(p["max_ms"] for p in rs)), "missed": int(sum(p["missed"] for p in rs)),
                     "lost": int(sum(p["lost"] for p in rs)),
                     "node_cpu_s_median": float(np.median([p["node_cpu_s"] for p in rs]))}
    out["p99_ratio"] = out["flood"]["p99_ms_median"] / out["baseline"]["p99_ms_median"]
    if summary is not None:
        out["node_summary"] = {k: summary.get(k) for k in ("malformed", "flood_dropped", "superseded", "updates",
                                                             "rejected_states", "hold_commands", "compute_us")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=100.0, help="state rate [Hz]")
    ap.add_argument("--count", type=int, default=1000, help="states per node (per phase with --flood)")
    ap.add_argument("--proposal-rate", type=float, default=4.0, help="proposals per second to the safety node")
    ap.add_argument("--idle", action="store_true", help="also measure the safety node without SCPO updates")
    ap.add_argument("--flood", type=float, metavar="RATE",
                    help="instead: the safety node under a RATE Hz proposal flood vs the same flood elsewhere")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--relay-node", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--flood-node", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.relay_node:
        return relay_main()
    if args.flood_node:
        return flood_main(args.flood_node)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if args.flood:
        return flood_report(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_latency_") as tmp:
        runs = [("relay", 0.0), ("safety", args.proposal_rate)]
        if args.idle:
            runs.append(("safety_idle", 0.0))
        for kind, prop in runs:
            sub = Path(tmp) / kind
            sub.mkdir()
            results[kind] = measure("safety" if kind.startswith("safety") else "relay", args.rate, args.count,
                                    prop, sub)
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


def flood_report(args) -> int:
    print(f"safety node under a {args.flood:g} Hz proposal flood (half malformed) vs the same flood on "
          f"{FLOOD_UNUSED_TOPIC}: {args.count} states at {args.rate:g} Hz per phase", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_latency_") as tmp:
        res = measure_flood(args.rate, args.count, args.proposal_rate, args.flood, Path(tmp))
    b, f = res["baseline"], res["flood"]
    print(f"{'':<10}{'median ms':>10}{'p99 ms':>9}{'max ms':>9}{'missed':>8}{'lost':>6}{'node cpu s':>11}"
          f"   (medians of the 3 phases; max, missed, lost: all 3)")
    for name, r in (("baseline", b), ("flood", f)):
        print(f"{name:<10}{r['median_ms_median']:>10.3f}{r['p99_ms_median']:>9.3f}{r['max_ms']:>9.1f}"
              f"{r['missed']:>8}{r['lost']:>6}{r['node_cpu_s_median']:>11.2f}")
    print(f"p99 ratio flood / baseline: {res['p99_ratio']:.2f}")
    if res.get("node_summary"):
        print(f"node: {json.dumps(res['node_summary'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"flood": res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
