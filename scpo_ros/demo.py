"""``scpo-ros demo``: the launch file's graph without ROS tooling.

Starts the same nodes from the same YAML (``--ros-args --params-file``), each in its own
process (``python -m scpo_ros.nodes.<name>``), over real DDS on ``ROS_DOMAIN_ID``:
bag_recorder, scpo_safety_node, expert, learner, then the simulator, which waits until
every subscriber of ``joint_states`` is matched so that no node (and not the bag)
misses the first state. After ``--duration`` s of simulation it stops the simulator
first, then the other nodes together, the recorder last, analyses the bag and prints a summary:
the nodes' own counts (their ``SUMMARY`` lines) beside the numbers read back from the
bag. Exit code 0 when the run was clean, 1 when the simulator reported a constraint
violation, 2 when a node failed.

``scpo-ros demo --compare`` runs two such pipelines side by side on identical simulators
with the same (malicious) expert, from the same YAML: ``/scpo`` (the graph above) and
``/safeguard`` (simulator, expert, ``action_safeguard`` projecting the expert's action,
which it takes as its raw action). One recorder writes both namespaces into one bag, and
the summary is one comparison table (``analysis.format_comparison``).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import graph as g

NODE_ORDER = (g.RECORDER,) + g.SCPO_PIPELINE
"""Start order: the recorder first, the simulator last."""
STOP_ORDER = ((g.SIMULATOR,), tuple(n for n in g.PUBLISHES if n != g.SIMULATOR), (g.RECORDER,))
"""Stop ranks: the simulators first (the last state gets its command), then every other node
at once (one after the other, the safety node's stale-state holds would fill the seconds a
learner takes to exit), the recorder last."""


def add_demo_arguments(ap) -> None:
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of simulation (default 30)")
    ap.add_argument("--bag", default="runs/demo", help="bag directory to create (default runs/demo)")
    ap.add_argument("--params", default=None, help="ROS parameter file (default config/scpo.yaml)")
    ap.add_argument("--no-malicious", action="store_true", help="a clean expert")
    ap.add_argument("--plant", default=None, help="plant of every node: a shipped NAME (config/plants/NAME.yaml), "
                                                  "a plant file or a package:// URL (default: the parameter file's "
                                                  "plant_file, the double integrator)")
    ap.add_argument("--namespace", default="", help="namespace of every node")
    ap.add_argument("--no-record", action="store_true", help="do not record a bag")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing bag directory")
    ap.add_argument("--json", default=None, help="write the summary as JSON here")
    ap.add_argument("--plots", default=None, help="write the analysis plots into this directory")
    ap.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for the graph to start")
    ap.add_argument("--compare", action="store_true",
                    help="SCPO (/scpo) and the action safeguard (/safeguard) side by side; one bag, one table")
    ap.add_argument("--model-mismatch", type=float, default=None,
                    help="the simulated plant differs from the model by this many times the plant file's declared "
                         "uncertainty (1: at its edge, > 1: beyond; plant_sim's model_mismatch)")
    ap.add_argument("--disturbance", default=None, choices=("none", "bounded", "uniform", "gaussian"),
                    help="additive disturbance of the simulated plant per step (plant_sim's disturbance)")
    ap.add_argument("--disturbance-scale", type=float, default=None,
                    help="the disturbance box as a multiple of the declared w_max (plant_sim's disturbance_scale)")
    ap.add_argument("--safeguard-params", default=None,
                    help="action_safeguard parameter file for --compare (default config/safeguard.yaml)")


def node_command(name: str, params_file: str, namespace: str = "", remaps=()) -> list[str]:
    cmd = [sys.executable, "-m", f"scpo_ros.nodes.{name}", "--ros-args", "--params-file", params_file]
    if namespace:
        cmd += ["-r", f"__ns:=/{namespace.strip('/')}"]
    for src, dst in remaps:
        cmd += ["-r", f"{src}:={dst}"]
    return cmd


class Graph:
    """The node processes of one run, their logs and their SUMMARY lines."""

    def __init__(self, log_dir: Path, env: dict):
        self.log_dir = log_dir
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.exit_codes: dict[str, int | None] = {}

    def start(self, name: str, cmd: list[str]) -> None:
        path = self.log_dir / f"{name}.log"
        self.logs[name] = path
        with open(path, "w") as f:
            # own process group: a Ctrl-C in the terminal reaches the demo only, which stops the nodes in order
            self.procs[name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True)

    def log_text(self, name: str) -> str:
        try:
            return self.logs[name].read_text()
        except OSError:
            return ""

    def wait_for_line(self, name: str, text: str, timeout: float, prefix: str = "") -> bool:
        """Wait until the log of ``name`` has a line containing ``prefix`` and then ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_text(name)
            if any(prefix in line and text in line[line.index(prefix):] + "\n"
                   for line in log.splitlines() if prefix in line):
                return True
            if self.dead():
                return False
            time.sleep(0.1)
        return False

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, name: str, timeout: float = 15.0) -> int | None:
        p = self.procs.get(name)
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def stop_all(self) -> dict[str, int | None]:
        """Stop every process: simulators first, the recorder last (``STOP_ORDER`` by node name;
        process keys are ``<node>`` or ``<namespace>.<node>``)."""
        def rank(key: str) -> int:
            name = key.rsplit(".", 1)[-1]
            return next(i for i, group in enumerate(STOP_ORDER) if name in group)
        codes = {}
        for r in sorted({rank(k) for k in self.procs}):
            group = [k for k in self.procs if rank(k) == r]
            for key in group:   # one signal to every process of a rank, then wait: namespaces stop together
                if self.procs[key].poll() is None:
                    self.procs[key].send_signal(signal.SIGINT)
            codes.update({key: self.stop(key) for key in group})
        return codes

    def summaries(self) -> dict[str, dict]:
        out = {}
        for name in self.procs:
            for line in self.log_text(name).splitlines():
                if line.startswith("SUMMARY "):
                    try:
                        out[name] = json.loads(line[len("SUMMARY "):].replace("NaN", "null"))
                    except json.JSONDecodeError:
                        pass
        return out


def _prepare_run(args, params_file: str) -> tuple[Path | None, Path, dict]:
    """Check the inputs, make the bag's and the logs' places; ``(bag, log_dir, env)``."""
    if not Path(params_file).exists():
        raise FileNotFoundError(f"no parameter file at {params_file}")
    bag = None if args.no_record else Path(args.bag)
    if bag is not None and bag.exists():
        if not args.overwrite:
            raise FileExistsError(f"{bag} exists (use --overwrite or another --bag)")
        shutil.rmtree(bag)
    log_dir = Path(str(bag) + ".logs") if bag is not None else Path("runs") / f"demo_logs_{os.getpid()}"
    if log_dir.exists():
        shutil.rmtree(log_dir)
    log_dir.mkdir(parents=True)
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    return bag, log_dir, env


def _common_overrides(args) -> tuple[dict, dict]:
    """Command-line overrides shared by every node (``--plant``), and the simulator's own."""
    common = {"plant_file": g.plant_file_of(args.plant)} if args.plant else {}
    sim = {name: value for name, value in (("model_mismatch", getattr(args, "model_mismatch", None)),
                                           ("disturbance", getattr(args, "disturbance", None)),
                                           ("disturbance_scale", getattr(args, "disturbance_scale", None)))
           if value is not None}
    return common, sim


def _launch_and_run(graph: Graph, plan: list[tuple[str, list[str], tuple[str, ...]]], args, log_dir: Path,
                    out) -> None:
    """Start the processes of ``plan`` (``(key, command, topics)`` in order) and run for ``args.duration``.

    A process with ``topics`` starts only once the recorder (key ``bag_recorder``, if
    running) has matched a publisher of each of them: the simulators, whose first state
    triggers those topics. Then waits until every simulator reports that its subscribers
    are matched, runs ``args.duration`` s while watching for dead nodes, and stops all
    processes in ``STOP_ORDER`` (also on error).
    """
    try:
        for key, cmd, topics in plan:
            if topics and g.RECORDER in graph.procs:
                for topic in topics:
                    if not graph.wait_for_line(g.RECORDER, f"{topic}\n", args.startup_timeout,
                                               prefix="publisher matched: "):
                        raise RuntimeError(f"the recorder found no publisher of {topic} (see {log_dir})")
            graph.start(key, cmd)
        for key in [k for k, _, _ in plan if k.endswith(g.SIMULATOR)]:
            if not graph.wait_for_line(key, "subscribers matched: starting", args.startup_timeout):
                raise RuntimeError(f"the graph did not start (exited: {graph.dead() or 'none'}; see {log_dir})")
        out(f"graph running: {args.duration:g} s of simulation ...")
        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline:
            dead = graph.dead()
            if dead:
                raise RuntimeError(f"node(s) exited early: {dead} (see {log_dir})")
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    finally:
        graph.exit_codes = graph.stop_all()


def run_graph(args, out=print) -> dict:
    """Run the graph; return the nodes' summaries, exit codes, the bag metrics (if recorded)."""
    if getattr(args, "compare", False):
        return run_compare(args, out)
    params_file = args.params or g.default_params_file()
    bag, log_dir, env = _prepare_run(args, params_file)
    common, common_lists = _common_overrides(args)
    overrides = {
        g.RECORDER: {"output": str(bag)} if bag is not None else {},
        g.SAFETY_NODE: dict(common),
        g.EXPERT: {**common, **({"malicious": False} if args.no_malicious else {})},
        g.LEARNER: dict(common),
        g.SIMULATOR: {**common, **common_lists,
                      "wait_for_subscribers": g.state_subscribers(g.SCPO_PIPELINE, recorder=bag is not None)},
    }
    graph = Graph(log_dir, env)
    run_params = g.merged_params_file(params_file, overrides, log_dir / "params.yaml")
    out(f"domain {env.get('ROS_DOMAIN_ID', '0')}, params {params_file}, logs {log_dir}")
    result = {"params_file": params_file, "bag": str(bag) if bag else None, "logs": str(log_dir)}
    ns = args.namespace.strip("/")
    prefix = f"/{ns}" if ns else ""
    plan = [(name, node_command(name, run_params, args.namespace),
             tuple(f"{prefix}/{t}" for t in g.state_answers(g.SCPO_PIPELINE)) if name == g.SIMULATOR else ())
            for name in NODE_ORDER if not (name == g.RECORDER and bag is None)]
    try:
        _launch_and_run(graph, plan, args, log_dir, out)
    finally:
        result["exit_codes"] = graph.exit_codes
    result["nodes"] = graph.summaries()
    if bag is not None:
        from .analysis import analyze, write_plots
        metrics, series = analyze(bag)
        result["bag_metrics"] = metrics
        if getattr(args, "plots", None):
            result["plots"] = write_plots(series, metrics, args.plots)
    return result


def run_compare(args, out=print) -> dict:
    """SCPO and the safeguard side by side (``--compare``): two namespaces, identical
    simulators and experts from the same YAML, one bag with both; returns the nodes'
    summaries per namespace, exit codes, and the per-pipeline bag metrics."""
    params_file = args.params or g.default_params_file()
    safeguard_file = getattr(args, "safeguard_params", None) or g.default_params_file("safeguard.yaml")
    if not Path(safeguard_file).exists():
        raise FileNotFoundError(f"no parameter file at {safeguard_file}")
    bag, log_dir, env = _prepare_run(args, params_file)
    common, common_lists = _common_overrides(args)
    recorder = bag is not None
    overrides = {
        g.RECORDER: {"output": str(bag), "topics": g.compare_recorded_topics()} if recorder else {},
        g.SAFETY_NODE: dict(common),
        g.SAFEGUARD: dict(common),
        g.EXPERT: {**common, **({"malicious": False} if args.no_malicious else {})},
        g.LEARNER: dict(common),
        # both simulators read this section: one value for both, the larger subscriber count
        g.SIMULATOR: {**common, **common_lists,
                      "wait_for_subscribers": g.state_subscribers(g.SCPO_PIPELINE, recorder)},
    }
    run_params = g.compare_params_file(params_file, safeguard_file, overrides, log_dir / "params.yaml")
    # the safeguard's simulator has fewer subscribers (no learner): its own copy of the file
    safeguard_params = g.merged_params_file(
        run_params, {g.SIMULATOR: {"wait_for_subscribers": g.state_subscribers(g.SAFEGUARD_PIPELINE, recorder)}},
        log_dir / "params_safeguard.yaml")
    graph = Graph(log_dir, env)
    out(f"domain {env.get('ROS_DOMAIN_ID', '0')}, params {params_file} + {safeguard_file}, logs {log_dir}")
    result = {"params_file": params_file, "safeguard_params": safeguard_file, "bag": str(bag) if bag else None,
              "logs": str(log_dir), "namespaces": list(g.COMPARE_PIPELINES)}
    plan = [(g.RECORDER, node_command(g.RECORDER, run_params), ())] if recorder else []
    for ns, nodes in g.COMPARE_PIPELINES.items():
        params = safeguard_params if ns == g.NS_SAFEGUARD else run_params
        for name in nodes:
            remaps = g.SAFEGUARD_REMAPS if name == g.SAFEGUARD else ()
            first = tuple(f"/{ns}/{t}" for t in g.state_answers(nodes)) if name == g.SIMULATOR else ()
            plan.append((f"{ns}.{name}", node_command(name, params, ns, remaps), first))
    # the simulators last: every other node (and the recorder) must hear their first state
    plan.sort(key=lambda entry: entry[0].endswith(g.SIMULATOR))
    try:
        _launch_and_run(graph, plan, args, log_dir, out)
    finally:
        result["exit_codes"] = graph.exit_codes
    summaries = graph.summaries()
    result["nodes"] = {ns: {name: summaries.get(f"{ns}.{name}", {}) for name in nodes}
                       for ns, nodes in g.COMPARE_PIPELINES.items()}
    if bag is not None:
        from .analysis import analyze_pipelines, write_plots
        columns = analyze_pipelines([bag])
        result["bag_metrics"] = {label: metrics for label, (metrics, _) in columns.items()}
        if getattr(args, "plots", None):
            result["plots"] = {label: write_plots(series, metrics, Path(args.plots) / label)
                               for label, (metrics, series) in columns.items()}
    return result


def format_summary(result: dict) -> str:
    nodes = result.get("nodes", {})
    sim, safety = nodes.get(g.SIMULATOR, {}), nodes.get(g.SAFETY_NODE, {})
    plant = sim.get("plant") or "double_integrator"
    lines = ["", f"=== SCPO demo: {plant} ==="]
    up = safety.get("updates", {})
    lines.append(f"  control steps          {safety.get('control_steps')}  (backup alone: {safety.get('backup_steps')},"
                 f" hold: {safety.get('hold_commands')})")
    lines.append(f"  SCPO updates           accepted {up.get('accepted')}, backtracked {up.get('backtracked')}, "
                 f"rejected {up.get('rejected')} (malformed {safety.get('malformed')}), "
                 f"infeasible {up.get('infeasible')}")
    lines.append(f"  fallbacks              {safety.get('fallbacks')}")
    mon = safety.get("model_monitor")
    if mon:
        lines.append(f"  model monitor          {'TRIPPED' if mon.get('tripped') else 'ok'}: {mon.get('trips')} trips, "
                     f"{mon.get('out_of_bounds')} of {mon.get('transitions')} transitions outside the declared "
                     f"uncertainty, detection delay {mon.get('detection_delay')}, "
                     f"{safety.get('monitor_held_back', 0)} updates held back")
    lines.append(f"  constraint violations  {sim.get('constraint_violations')}  (simulator, {sim.get('steps')} steps)")
    comp = safety.get("compute_us") or {}
    if comp.get("median") is not None:
        lines.append(f"  control compute        median {comp['median']:.1f} us, p99 {comp['p99']:.1f} us")
    m = result.get("bag_metrics")
    if m:
        from .analysis import format_table
        lines.append("")
        lines.append(format_table(m, title=f"from the bag {result['bag']}:"))
        lines.append(f"  (expert malicious {100 * (m.get('malicious_fraction') or 0):.0f} % of the time; "
                     f"{m['updates_shrunk']} committed updates shrunk by the projection)")
    lines.append(f"  exit codes: {result.get('exit_codes')}")
    return "\n".join(lines)


def format_compare_summary(result: dict) -> str:
    """The nodes' own counts per pipeline, then the comparison table read back from the bag."""
    nodes = result.get("nodes", {})
    scpo, guard = nodes.get(g.NS_SCPO, {}), nodes.get(g.NS_SAFEGUARD, {})
    safety, sg = scpo.get(g.SAFETY_NODE, {}), guard.get(g.SAFEGUARD, {})
    up = safety.get("updates", {})
    lines = ["", "=== SCPO vs action safeguard, side by side (same sim, same malicious expert) ==="]
    for ns in result.get("namespaces", []):
        sim = nodes.get(ns, {}).get(g.SIMULATOR, {})
        lines.append(f"  /{ns:<10} simulator: {sim.get('steps')} steps, "
                     f"{sim.get('constraint_violations')} constraint violations")
    lines.append(f"  /scpo       safety node: {safety.get('control_steps')} control steps, updates accepted "
                 f"{up.get('accepted')}, backtracked {up.get('backtracked')}, rejected {up.get('rejected')}, "
                 f"infeasible {up.get('infeasible')}; fallbacks {safety.get('fallbacks')}")
    lines.append(f"  /safeguard  safeguard: {sg.get('commands')} commands, {sg.get('interventions')} interventions, "
                 f"{sg.get('fallbacks')} fallbacks")
    columns = result.get("bag_metrics")
    if columns:
        from .analysis import format_comparison
        lines.append("")
        lines.append(format_comparison(columns, title=f"from the bag {result['bag']}:"))
    lines.append(f"  exit codes: {result.get('exit_codes')}")
    return "\n".join(lines)


def simulator_violations(result: dict) -> int:
    """Constraint violations the simulator(s) reported (both namespaces with --compare)."""
    nodes = result.get("nodes", {})
    sims = ([pipeline.get(g.SIMULATOR, {}) for pipeline in nodes.values()]
            if "namespaces" in result else [nodes.get(g.SIMULATOR, {})])
    return sum(sim.get("constraint_violations") or 0 for sim in sims)


def run_demo(args) -> int:
    try:
        result = run_graph(args)
    except (FileExistsError, FileNotFoundError, RuntimeError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 2
    print(format_compare_summary(result) if getattr(args, "compare", False) else format_summary(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    if any(code not in (0, None) for code in result["exit_codes"].values()):
        return 2
    return 1 if simulator_violations(result) else 0
