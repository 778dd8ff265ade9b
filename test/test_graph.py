"""The graph module (``scpo_ros.graph``, ROS-free): its topology against the nodes' sources,
the parameter-file merging, the compare parameter file and launch file, and the Foxglove
layout shipped in ``config/``."""
import ast
import importlib
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest
import yaml
from rosbags.interfaces import Nodetype

from scpo_ros import graph as g
from scpo_ros.bag import typestore
from scpo_ros.graph import COMPARE_PIPELINES, compare_params_file, node_parameters, plant_file_of, state_answers

REPO = Path(__file__).resolve().parent.parent
LAYOUT = REPO / "config" / "foxglove_layout.json"
PARAMS = REPO / "config" / "scpo.yaml"
SAFEGUARD_PARAMS = REPO / "config" / "safeguard.yaml"


# ------------------------------------------------------------------ topology

def test_every_topic_has_a_type_and_every_subscription_a_publisher():
    for node, topics in {**g.PUBLISHES, **g.SUBSCRIBES}.items():
        assert set(topics) <= set(g.TOPIC_TYPES), node
    assert g.LATCHED_TOPICS <= set(g.TOPIC_TYPES) and set(g.FALLBACK_MODES) <= set(g.SAFETY_MODES)
    remapped = {src for src, _ in g.SAFEGUARD_REMAPS}
    for pipeline in g.COMPARE_PIPELINES.values():
        published = set(g.pipeline_topics(pipeline))
        for node in pipeline:
            assert set(g.SUBSCRIBES[node]) - remapped <= published, node
        assert set(g.state_answers(pipeline)) <= published
    assert {dst for _, dst in g.SAFEGUARD_REMAPS} <= set(g.pipeline_topics(g.SAFEGUARD_PIPELINE))
    # the simulator starts last and waits for every node that reads its states
    assert all(p[-1] == g.SIMULATOR for p in g.COMPARE_PIPELINES.values())
    assert g.state_subscribers(g.SCPO_PIPELINE) == 3 and g.state_subscribers(g.SCPO_PIPELINE, recorder=True) == 4
    assert g.state_subscribers(g.SAFEGUARD_PIPELINE) == 2
    assert not hasattr(g, "plant_param_names")      # the plant is one parameter now: plant_file


def test_recorded_topics_and_names():
    assert set(g.RECORDED_TOPICS) == set(g.pipeline_topics(g.SCPO_PIPELINE)) | {g.DIAGNOSTICS}
    recorded = g.compare_recorded_topics()
    assert "/safeguard/intervention" in recorded and "/scpo/scpo_decision" in recorded
    assert "/safeguard/scpo_decision" not in recorded and recorded[-1] == g.DIAGNOSTICS
    assert g.base_name("/robot1/cmd") == g.CMD and g.base_name("/diagnostics") == g.DIAGNOSTICS
    assert g.topic_type("/scpo/certified_weights") == "std_msgs/msg/Float64MultiArray"
    assert g.topic_type("/elsewhere/odom") is None
    assert all(t in typestore().types for t in g.TOPIC_TYPES.values())


def _literal(node: ast.AST):
    """A topic argument of the nodes' sources: a string, or a name of the graph module."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
    return getattr(g, name, None) if name else None


def _endpoints(path: Path) -> dict[str, set]:
    """Topics and services a node file names in its create_* calls (read from source);
    ``ProposalIntake(node, topic, ...)`` subscribes for the safety node."""
    calls = {"create_publisher": "publishes", "create_lifecycle_publisher": "publishes",
             "create_subscription": "subscribes", "ProposalIntake": "subscribes", "create_service": "services"}
    out = {kind: set() for kind in calls.values()}
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and len(node.args) >= 2):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name in calls:
            out[calls[name]].add(_literal(node.args[1]))
    return out


@pytest.mark.parametrize("node", sorted(g.PUBLISHES))
def test_the_nodes_publish_and_subscribe_what_the_graph_says(node):
    found = _endpoints(REPO / "scpo_ros" / "nodes" / f"{node}.py")
    optional = {"/clock"} if node == g.SIMULATOR else set()   # publish_clock: true
    assert found["publishes"] - optional == set(g.PUBLISHES[node])
    assert found["subscribes"] == set(g.SUBSCRIBES[node])
    if node == g.SIMULATOR:
        assert found["services"] == {g.RESET_SERVICE}     # private: /plant_sim/reset


def test_the_parameter_files_name_only_graph_nodes():
    nodes = set(g.PUBLISHES) | {g.RECORDER}
    for path in sorted((REPO / "config").glob("*.yaml")):
        for key in yaml.safe_load(path.read_text()):
            assert key == "/**" or key.rsplit("/", 1)[-1] in nodes, (path.name, key)


# ------------------------------------------------------------------ parameter files

def test_merge_params_writes_into_every_section_that_names_the_node(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "/**": {"ros__parameters": {"dof": 1, "dt": 0.05}},
        "/**/expert": {"ros__parameters": {"malicious": True}},
        "/robot1/expert": {"ros__parameters": {"malicious": True, "seed": 3}},
    }))
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"/**/expert": {"ros__parameters": {"seed": 7}},
                                     "/**/action_safeguard": {"ros__parameters": {"solver": "daqp"}}}))
    out = g.merged_params_file(base, {"expert": {"malicious": False}, "learner": {"dof": 2}, "unused": {}},
                               tmp_path / "out.yaml", extra=[extra])
    data = yaml.safe_load(Path(out).read_text())
    assert data["/**/expert"]["ros__parameters"] == {"malicious": False, "seed": 7}
    assert data["/robot1/expert"]["ros__parameters"] == {"malicious": False, "seed": 3}
    assert data["/**/learner"]["ros__parameters"] == {"dof": 2}          # a new section for a node without one
    assert "/**/unused" not in data and data["/**/action_safeguard"]["ros__parameters"] == {"solver": "daqp"}
    # rcl's order: /** first, then the node's own sections over it
    assert g.node_parameters(data, "learner") == {"dof": 2, "dt": 0.05}
    assert g.node_parameters(data, "expert")["dof"] == 1
    assert g.node_parameters(data, "double_integrator_sim") == {"dof": 1, "dt": 0.05}


# ------------------------------------------------------------------ the Foxglove layout

def _field_path_ok(msgtype: str, fields: str) -> bool:
    """Whether ``fields`` (``layout.dim[0].label``) names a field chain of ``msgtype``."""
    ts = typestore()
    for i, part in enumerate(fields.split(".")):
        name = re.sub(r"\[\d+\]$", "", part)
        defs = dict(ts.fielddefs[msgtype][1])
        if name not in defs:
            return False
        kind, desc = defs[name]
        if kind in (Nodetype.SEQUENCE, Nodetype.ARRAY):
            kind, desc = desc[0]
        if kind == Nodetype.NAME:
            msgtype = desc
        elif i != len(fields.split(".")) - 1:
            return False
    return True


def _layout_paths(layout: dict) -> list[str]:
    """Every message path of the layout's panels (``/topic.field...`` or a topic)."""
    paths = []
    for panel in layout["configById"].values():
        paths += [p["value"] for p in panel.get("paths", [])]
        paths += [panel[k] for k in ("topicPath", "topicToRender") if k in panel]
    return paths


def _panel_ids(tree) -> set[str]:
    return {tree} if isinstance(tree, str) else _panel_ids(tree["first"]) | _panel_ids(tree["second"])


def test_the_foxglove_layout_shows_the_graphs_topics():
    layout = json.loads(LAYOUT.read_text())
    assert _panel_ids(layout["layout"]) == set(layout["configById"])
    topics = set()
    for path in _layout_paths(layout):
        topic, _, fields = path.partition(".")
        assert topic in {"/" + t.lstrip("/") for t in g.RECORDED_TOPICS}, path   # recorded, so a bag shows it too
        assert not fields or _field_path_ok(g.topic_type(topic), fields), path
        topics.add(g.base_name(topic))
    assert {g.JOINT_STATES, g.CMD, g.REFERENCE, g.SAFETY_MODE, g.SCPO_DECISION, g.DIAGNOSTICS} <= topics


def test_setup_ships_the_layout_the_parameter_files_and_the_launch_files(monkeypatch):
    """setup.py's data_files (what colcon and pip install into share/scpo_ros)."""
    captured = {}
    fake = types.ModuleType("setuptools")
    fake.setup = lambda **kwargs: captured.update(kwargs)
    fake.find_packages = lambda **kwargs: []
    monkeypatch.setitem(sys.modules, "setuptools", fake)
    monkeypatch.chdir(REPO)
    exec(compile((REPO / "setup.py").read_text(), "setup.py", "exec"), {"__name__": "__main__"})
    shipped = {dest: set(files) for dest, files in captured["data_files"]}
    assert {"config/foxglove_layout.json", "config/scpo.yaml",
            "config/safeguard.yaml"} <= shipped["share/scpo_ros/config"]
    assert {"launch/scpo.launch.py", "launch/compare_scpo_vs_safeguard.launch.py"} <= shipped["share/scpo_ros/launch"]
    assert "config/scpo_double_integrator.yaml" not in shipped["share/scpo_ros/config"]      # renamed config/scpo.yaml
    assert {f"config/plants/{n}.yaml" for n in ("double_integrator", "double_integrator_2axis", "pendulum")} <= \
        shipped["share/scpo_ros/config/plants"]


def test_the_shipped_parameter_file_names_the_plant_file_for_every_node():
    data = yaml.safe_load(PARAMS.read_text())
    shared = data["/**"]["ros__parameters"]
    assert shared["plant_file"] == "package://scpo_ros/config/plants/double_integrator.yaml"
    from scpo_ros.plant import load_plant
    assert load_plant(shared["plant_file"]).digest == load_plant("double_integrator").digest
    old = {"dof", "dt", "p_max", "v_max", "u_max", "q_pos", "q_vel", "r_act", "p0_max", "v0_max", "r_max",
           "joint_names", "horizon"}
    for key, section in data.items():
        assert not old & set(section["ros__parameters"]), (key, old & set(section["ros__parameters"]))


def test_plant_file_of_a_name_a_path_and_a_url(tmp_path, monkeypatch):
    assert plant_file_of("double_integrator") == "package://scpo_ros/config/plants/double_integrator.yaml"
    assert plant_file_of("  mass_spring_damper ") == "package://scpo_ros/config/plants/mass_spring_damper.yaml"
    url = "package://scpo_ros/config/plants/pendulum.yaml"
    assert plant_file_of(url) == url
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plants").mkdir()
    (tmp_path / "plants" / "mine.yaml").write_text("name: mine\n")
    assert plant_file_of("plants/mine.yaml") == str(tmp_path / "plants" / "mine.yaml")   # made absolute
    assert plant_file_of("mine.yaml") == "mine.yaml"                # not there: as given (the loader says why)
    assert plant_file_of("/no/such/plant.yaml") == "/no/such/plant.yaml"
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="plant is empty"):
            plant_file_of(empty)


# ------------------------------------------------------------------ the compare parameter file and launch file

def _declared(module: str) -> set[str]:
    mod = importlib.import_module(f"scpo_ros.nodes.{module}")
    return {spec.name for spec in mod.PARAMS}


def test_compare_params_file_gives_the_safeguard_the_simulators_plant(tmp_path):
    pytest.importorskip("rclpy")
    base = tmp_path / "base.yaml"
    data = yaml.safe_load(PARAMS.read_text())
    # the plant changes in the shared section; the simulator's own section names another: that one wins
    data["/**"]["ros__parameters"]["plant_file"] = "package://scpo_ros/config/plants/mass_spring_damper.yaml"
    base.write_text(yaml.safe_dump(data))
    two = plant_file_of("double_integrator_2axis")
    out = compare_params_file(base, SAFEGUARD_PARAMS, {"expert": {"malicious": False}, g.SIMULATOR:
                                                       {"plant_file": two}}, tmp_path / "out.yaml")
    merged = yaml.safe_load(Path(out).read_text())
    sim, guard = node_parameters(merged, g.SIMULATOR), node_parameters(merged, g.SAFEGUARD)
    assert sim["plant_file"] == guard["plant_file"] == two
    assert merged[f"/**/{g.SAFEGUARD}"]["ros__parameters"]["plant_file"] == two      # copied into its section
    assert node_parameters(merged, "expert")["plant_file"].endswith("mass_spring_damper.yaml")   # the shared one
    # the shared plant alone: the safeguard guards it too
    out = compare_params_file(base, SAFEGUARD_PARAMS, {}, tmp_path / "out2.yaml")
    merged2 = yaml.safe_load(Path(out).read_text())
    assert node_parameters(merged2, g.SAFEGUARD)["plant_file"] == data["/**"]["ros__parameters"]["plant_file"]
    assert node_parameters(merged, "expert")["malicious"] is False
    assert guard["command_delay_steps"] == 0 and guard["solver"] == "auto"
    # every parameter the file gives a node's own section is one that node declares
    for key, section in merged.items():
        node = key.rsplit("/", 1)[-1]
        if key != "/**":
            assert set(section["ros__parameters"]) <= _declared(node), key


class _FakeNode:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def test_launch_file_nodes_match_the_graph(tmp_path, monkeypatch):
    """The launch file without launch_ros: its node list, names, namespaces, remappings and
    parameter files checked against the demo's pipelines and the nodes' declared parameters."""
    pytest.importorskip("rclpy")
    path = REPO / "launch" / "compare_scpo_vs_safeguard.launch.py"
    stubs = {name: types.ModuleType(name) for name in (
        "launch", "launch.actions", "launch.event_handlers", "launch.events", "launch_ros", "launch_ros.actions",
        "ament_index_python", "ament_index_python.packages")}
    stubs["launch"].LaunchDescription = list
    stubs["launch.actions"].DeclareLaunchArgument = lambda name, **kw: ("arg", name, kw)
    stubs["launch.actions"].OpaqueFunction = lambda function: ("opaque", function)
    stubs["launch.actions"].RegisterEventHandler = lambda handler: handler
    stubs["launch.actions"].LogInfo = lambda msg: ("log", msg)
    stubs["launch.actions"].EmitEvent = lambda event: ("emit", event)
    stubs["launch.event_handlers"].OnProcessIO = lambda **kw: ("io", kw)
    stubs["launch.event_handlers"].OnProcessExit = lambda **kw: ("exit", kw)
    stubs["launch.events"].Shutdown = lambda reason: ("shutdown", reason)
    stubs["launch_ros.actions"].Node = _FakeNode
    stubs["ament_index_python.packages"].get_package_share_directory = lambda pkg: str(REPO)
    for name, mod in stubs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("compare_launch", path)
    launch_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_file)
    description = launch_file.generate_launch_description()
    args = {a[1]: a[2]["default_value"] for a in description if a[0] == "arg"}
    assert Path(args["params_file"]) == PARAMS and Path(args["safeguard_params"]) == SAFEGUARD_PARAMS
    assert args["plant"] == "double_integrator" and "dof" not in args
    context = types.SimpleNamespace(launch_configurations={**args, "record": "true", "bag": str(tmp_path / "bag"),
                                                           "plant": "double_integrator_2axis",
                                                           "malicious": "false"})
    actions = description[-1][1](context)
    # with record:=true each simulator starts once the recorder logged a matched publisher of
    # each topic its first state triggers (as the demo waits): feed the handlers those lines
    io = [a[1] for a in actions if isinstance(a, tuple) and a[0] == "io"]
    assert len(io) == len(COMPARE_PIPELINES)
    sims = []
    for handler in io:
        line = lambda text: types.SimpleNamespace(text=text.encode(), from_stdout=False)  # noqa: E731
        assert handler["on_stderr"](line("[INFO] [bag_recorder]: publisher matched: /diagnostics\n")) is None
        for ns, pipeline in COMPARE_PIPELINES.items():
            for t in state_answers(pipeline):
                started = handler["on_stderr"](line(f"\x1b[0m[INFO] [1.0] [bag_recorder]: publisher matched: /{ns}/{t}"
                                                    "\x1b[0m\r\n"))
                if started:
                    sims += [a for a in started if isinstance(a, _FakeNode)]
    assert [s.kwargs["name"] for s in sims] == ["plant_sim"] * len(COMPARE_PIPELINES)
    exits = [a[1] for a in actions if isinstance(a, tuple) and a[0] == "exit"]
    assert all(e["on_exit"](types.SimpleNamespace(returncode=1), None) is None for e in exits)  # all started
    nodes = [n.kwargs for n in [a for a in actions if isinstance(a, _FakeNode)] + sims]
    started = {(n["namespace"], n["name"]) for n in nodes if "namespace" in n}
    assert started == {(ns, name) for ns, names in COMPARE_PIPELINES.items() for name in names}
    assert any(n["executable"] == "bag_recorder" and "namespace" not in n for n in nodes)
    for n in nodes:
        assert n["executable"] == n["name"]
        merged = yaml.safe_load(Path(n["parameters"][0]).read_text())
        values = node_parameters(merged, n["name"])
        own = {k for key, sec in merged.items() if key != "/**" and key.rsplit("/", 1)[-1] == n["name"]
               for k in sec["ros__parameters"]}
        assert own <= _declared(n["name"]), (n["name"], own - _declared(n["name"]))
        if n["name"] != "bag_recorder":
            assert values["plant_file"] == "package://scpo_ros/config/plants/double_integrator_2axis.yaml", n["name"]
        if n["name"] == "action_safeguard":
            assert n["remappings"] == [("raw_action", "expert_action")]
        if n["name"] == "expert":
            assert values["malicious"] is False
        if n["name"] == "plant_sim":
            assert values["wait_for_subscribers"] == (4 if n["namespace"] == "scpo" else 3)
        if n["name"] == "bag_recorder":
            assert "/safeguard/intervention" in values["topics"] and "/scpo/scpo_decision" in values["topics"]


def test_demo_mismatch_options_reach_the_simulator_only():
    import argparse

    from scpo_ros.demo import _common_overrides, add_demo_arguments
    ap = argparse.ArgumentParser()
    add_demo_arguments(ap)
    common, sim = _common_overrides(ap.parse_args(["--plant", "double_integrator_uncertain", "--model-mismatch", "2",
                                                   "--disturbance", "bounded", "--disturbance-scale", "1.5"]))
    assert common == {"plant_file": "package://scpo_ros/config/plants/double_integrator_uncertain.yaml"}
    assert sim == {"model_mismatch": 2.0, "disturbance": "bounded", "disturbance_scale": 1.5}
    assert _common_overrides(ap.parse_args([])) == ({}, {})
    with pytest.raises(SystemExit):
        ap.parse_args(["--disturbance", "sometimes"])
