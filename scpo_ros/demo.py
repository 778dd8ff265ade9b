"""``scpo-ros demo``: the launch file's graph without ROS tooling.

Starts the same nodes from the same YAML (``--ros-args --params-file``), each in its own
process (``python -m scpo_ros.nodes.<name>``), over real DDS on ``ROS_DOMAIN_ID``:
bag_recorder, scpo_safety_node, expert, learner, then the simulator, which waits until
every subscriber of ``joint_states`` is matched so that no node (and not the bag)
misses the first state. After ``--duration`` s of simulation it stops the simulator
first, then the other nodes, the recorder last, analyses the bag and prints a summary:
the nodes' own counts (their ``SUMMARY`` lines) beside the numbers read back from the
bag. Exit code 0 when the run was clean, 1 when the simulator reported a constraint
violation, 2 when a node failed.
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

NODE_ORDER = ("bag_recorder", "scpo_safety_node", "expert", "learner", "double_integrator_sim")
FIRST_STATE_TOPICS = ("cmd", "expert_action", "reference", "malicious")
STOP_ORDER = ("double_integrator_sim", "learner", "expert", "scpo_safety_node", "bag_recorder")


def default_params_file() -> str:
    """The package's YAML: from the ament index when installed as a ROS package, else the source tree."""
    try:
        from ament_index_python.packages import get_package_share_directory
        path = Path(get_package_share_directory("scpo_ros")) / "config" / "scpo_double_integrator.yaml"
        if path.exists():
            return str(path)
    except Exception:
        pass
    return str(Path(__file__).resolve().parent.parent / "config" / "scpo_double_integrator.yaml")


def add_demo_arguments(ap) -> None:
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of simulation (default 30)")
    ap.add_argument("--bag", default="runs/demo", help="bag directory to create (default runs/demo)")
    ap.add_argument("--params", default=None, help="ROS parameter file (default config/scpo_double_integrator.yaml)")
    ap.add_argument("--no-malicious", action="store_true", help="a clean expert")
    ap.add_argument("--dof", type=int, default=None, help="override dof for every node")
    ap.add_argument("--namespace", default="", help="namespace of every node")
    ap.add_argument("--no-record", action="store_true", help="do not record a bag")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing bag directory")
    ap.add_argument("--json", default=None, help="write the summary as JSON here")
    ap.add_argument("--plots", default=None, help="write the analysis plots into this directory")
    ap.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for the graph to start")


def merged_params_file(base: str | Path, overrides: dict[str, dict], out: str | Path) -> str:
    """Copy of the parameter file ``base`` with ``overrides`` (node name -> {param: value}) merged in.

    Why not ``-p name:=value``: rcl applies a node's own section (``/**/expert``) over the
    wildcard section (``/**``) that ``-p`` and launch's dict parameters land in, so those
    would lose against the YAML. Here every override goes into each section of the file
    that names the node (and into ``/**/<node>`` if none does).
    """
    import yaml

    data = yaml.safe_load(Path(base).read_text()) or {}
    for node, params in overrides.items():
        if not params:
            continue
        keys = [k for k in data if k.rstrip("/").rsplit("/", 1)[-1] == node]
        if not keys:
            keys = [f"/**/{node}"]
            data[keys[0]] = {"ros__parameters": {}}
        for k in keys:
            data[k].setdefault("ros__parameters", {}).update(params)
    Path(out).write_text(yaml.safe_dump(data, sort_keys=False))
    return str(out)


def node_command(name: str, params_file: str, namespace: str = "") -> list[str]:
    cmd = [sys.executable, "-m", f"scpo_ros.nodes.{name}", "--ros-args", "--params-file", params_file]
    if namespace:
        cmd += ["-r", f"__ns:=/{namespace.strip('/')}"]
    return cmd


class Graph:
    """The node processes of one run, their logs and their SUMMARY lines."""

    def __init__(self, log_dir: Path, env: dict):
        self.log_dir = log_dir
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

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
        return {name: self.stop(name) for name in STOP_ORDER if name in self.procs}

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


def run_graph(args, out=print) -> dict:
    """Run the graph; return the nodes' summaries, exit codes, the bag metrics (if recorded)."""
    params_file = args.params or default_params_file()
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
    common = {"dof": args.dof} if args.dof else {}
    if args.dof:
        common_lists = {"initial_position": [0.0], "initial_velocity": [0.0]}
    else:
        common_lists = {}
    subscribers = 3 + (0 if bag is None else 1)   # safety node, expert, learner (+ recorder)
    overrides = {
        "bag_recorder": {"output": str(bag)} if bag is not None else {},
        "scpo_safety_node": dict(common),
        "expert": {**common, **({"malicious": False} if args.no_malicious else {})},
        "learner": dict(common),
        "double_integrator_sim": {**common, **common_lists, "wait_for_subscribers": subscribers},
    }
    graph = Graph(log_dir, env)
    run_params = merged_params_file(params_file, overrides, log_dir / "params.yaml")
    out(f"domain {env.get('ROS_DOMAIN_ID', '0')}, params {params_file}, logs {log_dir}")
    result = {"params_file": params_file, "bag": str(bag) if bag else None, "logs": str(log_dir)}
    try:
        for name in NODE_ORDER:
            if name == "bag_recorder" and bag is None:
                continue
            if name == "double_integrator_sim" and bag is not None:
                # the first state triggers these topics: the recorder must already hear their publishers
                for topic in FIRST_STATE_TOPICS:
                    if not graph.wait_for_line("bag_recorder", f"/{topic}\n", args.startup_timeout,
                                               prefix="publisher matched: "):
                        raise RuntimeError(f"the recorder found no publisher of {topic} (see {log_dir})")
            graph.start(name, node_command(name, run_params, args.namespace))
        if not graph.wait_for_line("double_integrator_sim", "subscribers matched: starting", args.startup_timeout):
            dead = graph.dead()
            raise RuntimeError(f"the graph did not start (exited: {dead or 'none'}; see {log_dir})")
        out(f"graph running: {args.duration:g} s of simulation ...")
        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline:
            dead = graph.dead()
            if dead:
                raise RuntimeError(f"node(s) exited early: {dead} (see {log_dir})")
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    finally:
        result["exit_codes"] = graph.stop_all()
    result["nodes"] = graph.summaries()
    if bag is not None:
        from .analysis import analyze, write_plots
        metrics, series = analyze(bag)
        result["bag_metrics"] = metrics
        if getattr(args, "plots", None):
            result["plots"] = write_plots(series, metrics, args.plots)
    return result


def format_summary(result: dict) -> str:
    nodes = result.get("nodes", {})
    sim, safety = nodes.get("double_integrator_sim", {}), nodes.get("scpo_safety_node", {})
    lines = ["", "=== SCPO double-integrator demo ==="]
    up = safety.get("updates", {})
    lines.append(f"  control steps          {safety.get('control_steps')}  (backup alone: {safety.get('backup_steps')},"
                 f" hold: {safety.get('hold_commands')})")
    lines.append(f"  SCPO updates           accepted {up.get('accepted')}, backtracked {up.get('backtracked')}, "
                 f"rejected {up.get('rejected')} (malformed {safety.get('malformed')}), "
                 f"infeasible {up.get('infeasible')}")
    lines.append(f"  fallbacks              {safety.get('fallbacks')}")
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


def run_demo(args) -> int:
    try:
        result = run_graph(args)
    except (FileExistsError, FileNotFoundError, RuntimeError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 2
    print(format_summary(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    if any(code not in (0, None) for code in result["exit_codes"].values()):
        return 2
    violations = result["nodes"].get("double_integrator_sim", {}).get("constraint_violations")
    return 1 if violations else 0
