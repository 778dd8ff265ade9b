"""The scpo_ros ROS 2 graph as data (no rclpy): nodes, topics, command labels, safety modes,
and the parameter files every node reads.

The launch files, ``scpo-ros demo``, ``bag_recorder`` and the bag analysis all take the graph
from here, so a topic name, a label or a pipeline is written once. Topic names are relative
(a namespace applies) except ``/diagnostics``. The statuses of ``scpo_decision`` records are
the projector's (``scpo.STATUSES``, ``scpo.COMMITTED``).

Parameter files: rcl applies a node's own section (``/**/expert``) over the wildcard section
(``/**``) that ``-p name:=value`` and launch's dict parameters land in, so those would lose
against the YAML. ``merged_params_file`` therefore writes overrides into a copy of the file,
into every section that names the node.
"""
from __future__ import annotations

from pathlib import Path

import yaml

# ------------------------------------------------------------------ topics

JOINT_STATES = "joint_states"
CMD = "cmd"
EXPERT_ACTION = "expert_action"
REFERENCE = "reference"
MALICIOUS = "malicious"
PROPOSED_WEIGHTS = "proposed_weights"
CERTIFIED_WEIGHTS = "certified_weights"
SCPO_DECISION = "scpo_decision"
SAFETY_MODE = "safety_mode"
CONSTRAINT_VIOLATION = "constraint_violation"
PLANT = "plant"
INTERVENTION = "intervention"
RAW_ACTION = "raw_action"
MODEL_MONITOR = "model_monitor"
DIAGNOSTICS = "/diagnostics"
CLOCK = "/clock"

TOPIC_TYPES = {
    JOINT_STATES: "sensor_msgs/msg/JointState",
    CMD: "std_msgs/msg/Float64MultiArray",
    EXPERT_ACTION: "std_msgs/msg/Float64MultiArray",
    REFERENCE: "std_msgs/msg/Float64MultiArray",
    MALICIOUS: "std_msgs/msg/Bool",
    PROPOSED_WEIGHTS: "std_msgs/msg/Float64MultiArray",
    CERTIFIED_WEIGHTS: "std_msgs/msg/Float64MultiArray",
    SCPO_DECISION: "std_msgs/msg/String",
    SAFETY_MODE: "std_msgs/msg/String",
    CONSTRAINT_VIOLATION: "std_msgs/msg/String",
    PLANT: "std_msgs/msg/String",
    INTERVENTION: "std_msgs/msg/String",
    RAW_ACTION: "std_msgs/msg/Float64MultiArray",
    MODEL_MONITOR: "std_msgs/msg/String",
    DIAGNOSTICS: "diagnostic_msgs/msg/DiagnosticArray",
}
"""Topic name -> ROS 2 type name (``pkg/msg/Name``)."""

LATCHED_TOPICS = frozenset({CERTIFIED_WEIGHTS, SAFETY_MODE, PLANT, MODEL_MONITOR})
"""Published transient-local: a late subscriber gets the value already sent. ``plant``: one
JSON ``plant.plant_record`` per publishing node (``"node"`` says which), so a bag carries
the plant file and the limits in force. ``model_monitor``: the safety node's model monitor
(``model_monitor.ModelMonitor.record``), on every trip and clear and once a second."""


def base_name(topic: str) -> str:
    """``/ns/cmd`` -> ``cmd``; ``/diagnostics`` keeps its slash (it is absolute in the graph)."""
    base = topic.rsplit("/", 1)[-1]
    return DIAGNOSTICS if "/" + base == DIAGNOSTICS else base


def topic_type(topic: str) -> str | None:
    """The type of a graph topic given by any name that resolves to it (any namespace)."""
    return TOPIC_TYPES.get(base_name(topic))


# ------------------------------------------------------------------ commands and modes

LABEL_POLICY = "policy"
"""``cmd`` from the certified policy (the safety node)."""
LABEL_BACKUP = "backup"
"""``cmd`` from the fallback alone (either controller)."""
LABEL_HOLD = "hold"
"""``cmd`` sent without a fresh state (the safety node's stale-state hold)."""
LABEL_SAFEGUARD = "safeguard"
"""``cmd`` from the action safeguard's projection of the raw action."""
COMMAND_LABELS = (LABEL_POLICY, LABEL_BACKUP, LABEL_HOLD, LABEL_SAFEGUARD)
"""What ``cmd``'s ``layout.dim[0].label`` says about the command's source."""

MODE_INACTIVE = "inactive"
MODE_WAITING_FOR_STATE = "waiting_for_state"
MODE_WAITING_FOR_CERTIFICATE = "waiting_for_certificate"
MODE_POLICY = "policy"
MODE_BACKUP_REGION = "backup_region"
MODE_RETURNING = "returning"
MODE_BACKUP_RECERTIFYING = "backup_recertifying"
MODE_HOLD_STALE = "hold_stale"
MODE_SHUTTING_DOWN = "shutting_down"
MODE_MODEL_MISMATCH = "backup_model_mismatch"

LEVEL_OK, LEVEL_WARN, LEVEL_ERROR = 0, 1, 2
"""Diagnostic levels, as ``diagnostic_msgs/DiagnosticStatus`` numbers them (``ros.diagnostics``
takes these or the message's own constants)."""

SAFETY_MODE_TABLE = {
    # mode: (diagnostic level, the ``control`` diagnostic's text, the reason a state gives for entering it)
    MODE_INACTIVE: (LEVEL_OK, "inactive: {inactive_behavior}", None),
    MODE_WAITING_FOR_STATE: (LEVEL_WARN, "waiting for a state", None),
    MODE_WAITING_FOR_CERTIFICATE: (LEVEL_WARN, "fallback until the first certification of the weights", None),
    MODE_POLICY: (LEVEL_OK, "certified policy in force", "the certified policy acts"),
    MODE_BACKUP_REGION: (LEVEL_WARN, "FALLBACK: state or reference outside the certified region",
                         "state or reference outside the certified region"),
    MODE_RETURNING: (LEVEL_WARN, "fallback: {policy_return_steps} qualifying states before the policy acts",
                     "back in the certified region"),
    MODE_BACKUP_RECERTIFYING: (LEVEL_WARN, "FALLBACK: re-certifying after a parameter change", None),
    MODE_HOLD_STALE: (LEVEL_ERROR, "STALE STATE: hold command ({hold_mode})", None),
    MODE_MODEL_MISMATCH: (LEVEL_ERROR, "MODEL MISMATCH: the plant left its declared uncertainty; the fallback acts "
                                       "and no update is committed", "the model monitor tripped"),
    MODE_SHUTTING_DOWN: (LEVEL_WARN, "shutting down: fallback until the plant is at rest", None),
}
"""The safety node's modes: level and diagnostic text (``str.format`` of the node's
parameters) and, for the modes a state selects, the reason its ``safety_mode`` record gives
(``STATE_RECEIVED`` for the others)."""
STATE_RECEIVED = "state received"

SAFETY_MODES = tuple(SAFETY_MODE_TABLE)
"""The safety node's modes (``safety_mode`` records)."""
FALLBACK_MODES = (MODE_BACKUP_REGION, MODE_BACKUP_RECERTIFYING, MODE_HOLD_STALE, MODE_MODEL_MISMATCH)
"""The modes in which the fallback acts instead of the policy (counted as fallbacks)."""


def mode_level(mode: str) -> int:
    """The diagnostic level of ``mode`` (``LEVEL_OK``, ``LEVEL_WARN``, ``LEVEL_ERROR``)."""
    return SAFETY_MODE_TABLE[mode][0]


def mode_text(mode: str, params) -> str:
    """The ``control`` diagnostic's text for ``mode`` under the node's parameter values ``params``."""
    return SAFETY_MODE_TABLE[mode][1].format(**params)


def mode_reason(mode: str) -> str:
    """Why a state put the safety node into ``mode`` (its ``safety_mode`` record's reason)."""
    return SAFETY_MODE_TABLE[mode][2] or STATE_RECEIVED


# ------------------------------------------------------------------ nodes and pipelines

SIMULATOR = "plant_sim"
RECORDER = "bag_recorder"
SAFETY_NODE = "scpo_safety_node"
SAFEGUARD = "action_safeguard"
EXPERT = "expert"
LEARNER = "learner"

SUBSCRIBES = {
    SIMULATOR: (CMD,),
    EXPERT: (JOINT_STATES,),
    LEARNER: (JOINT_STATES, REFERENCE, EXPERT_ACTION, CERTIFIED_WEIGHTS),
    SAFETY_NODE: (JOINT_STATES, REFERENCE, PROPOSED_WEIGHTS),
    SAFEGUARD: (JOINT_STATES, RAW_ACTION, REFERENCE),
}
PUBLISHES = {
    SIMULATOR: (JOINT_STATES, CONSTRAINT_VIOLATION, PLANT),
    EXPERT: (EXPERT_ACTION, REFERENCE, MALICIOUS),
    LEARNER: (PROPOSED_WEIGHTS,),
    SAFETY_NODE: (CMD, CERTIFIED_WEIGHTS, SCPO_DECISION, SAFETY_MODE, PLANT, MODEL_MONITOR),
    SAFEGUARD: (CMD, INTERVENTION, PLANT),
}
"""Topics per node (relative names; every node also publishes ``/diagnostics``, the simulator
``/clock`` with ``publish_clock``; the recorder subscribes to what it records)."""

RESET_SERVICE = "~/reset"
"""The simulator's ``std_srvs/srv/Trigger`` service (private: ``/plant_sim/reset``)."""

SCPO_PIPELINE = (SAFETY_NODE, EXPERT, LEARNER, SIMULATOR)
"""The SCPO graph in start order: the simulator last (its first state must reach every node)."""
SAFEGUARD_PIPELINE = (SAFEGUARD, EXPERT, SIMULATOR)
"""The action safeguard's graph, the expert as its policy (``SAFEGUARD_REMAPS``)."""
NS_SCPO, NS_SAFEGUARD = "scpo", "safeguard"
"""The two pipelines' names: their namespaces in the side-by-side run, their kinds in the bag analysis."""
COMPARE_PIPELINES = {NS_SCPO: SCPO_PIPELINE, NS_SAFEGUARD: SAFEGUARD_PIPELINE}
"""``demo --compare`` and the compare launch file: namespace -> pipeline."""
SAFEGUARD_REMAPS = ((RAW_ACTION, EXPERT_ACTION),)
"""The expert is the safeguard's policy: its action is the raw action to project."""

STATE_ANSWERS = (CMD, EXPERT_ACTION, REFERENCE, MALICIOUS)
"""Topics the simulator's first state triggers in the SCPO pipeline: a recorder that has
matched their publishers records the run from its first command."""


def pipeline_topics(pipeline) -> tuple[str, ...]:
    """Every topic the nodes of ``pipeline`` publish, in the order of ``pipeline``."""
    out: list[str] = []
    for node in pipeline:
        out += [t for t in PUBLISHES[node] if t not in out]
    return tuple(out)


def state_answers(pipeline) -> tuple[str, ...]:
    """The topics the first state triggers in ``pipeline`` (the safeguard's records too)."""
    return STATE_ANSWERS + ((INTERVENTION,) if SAFEGUARD in pipeline else ())


def state_subscribers(pipeline, recorder: bool = False) -> int:
    """The simulator's ``wait_for_subscribers``: nodes of ``pipeline`` that read ``joint_states``,
    plus the recorder."""
    return sum(JOINT_STATES in SUBSCRIBES[node] for node in pipeline) + int(recorder)


RECORDED_TOPICS = pipeline_topics(SCPO_PIPELINE) + (DIAGNOSTICS,)
"""What ``bag_recorder`` records by default: the SCPO graph."""


def compare_recorded_topics() -> list[str]:
    """The recorder's topics of the side-by-side run: both namespaces, and ``/diagnostics``."""
    return [f"/{ns}/{t}" for ns, nodes in COMPARE_PIPELINES.items() for t in pipeline_topics(nodes)] + [DIAGNOSTICS]


# ------------------------------------------------------------------ parameter files

def default_params_file(name: str = "scpo.yaml") -> str:
    """A YAML of the package: from the ament index when installed as a ROS package, else the source tree."""
    try:
        from ament_index_python.packages import get_package_share_directory
        path = Path(get_package_share_directory("scpo_ros")) / "config" / name
        if path.exists():
            return str(path)
    except Exception:   # no ament index, or the package is not in it
        pass
    return str(Path(__file__).resolve().parent.parent / "config" / name)


def _section_node(key: str) -> str:
    return key.rstrip("/").rsplit("/", 1)[-1]


def merge_params(data: dict, overrides: dict[str, dict]) -> dict:
    """``overrides`` (node name -> {param: value}) merged into the parameter-file dict ``data``:
    into each section that names the node, or a new ``/**/<node>`` if none does."""
    for node, params in overrides.items():
        if not params:
            continue
        keys = [k for k in data if _section_node(k) == node]
        if not keys:
            keys = [f"/**/{node}"]
            data[keys[0]] = {"ros__parameters": {}}
        for k in keys:
            data[k].setdefault("ros__parameters", {}).update(params)
    return data


def merged_params_file(base: str | Path, overrides: dict[str, dict], out: str | Path,
                       extra: list[str | Path] = ()) -> str:
    """Copy of the parameter file ``base`` with ``overrides`` (node name -> {param: value})
    merged in (``merge_params``); ``extra`` files are merged in first, section by section
    (their values win over ``base``'s)."""
    data = yaml.safe_load(Path(base).read_text()) or {}
    for path in extra:
        for key, section in (yaml.safe_load(Path(path).read_text()) or {}).items():
            params = (section or {}).get("ros__parameters", {})
            data.setdefault(key, {}).setdefault("ros__parameters", {}).update(params)
    merge_params(data, overrides)
    Path(out).write_text(yaml.safe_dump(data, sort_keys=False))
    return str(out)


def node_parameters(data: dict, node: str) -> dict:
    """The values a node named ``node`` (any namespace) gets from the parameter-file dict:
    ``/**`` first, its own sections over it (rcl's order)."""
    out = dict((data.get("/**") or {}).get("ros__parameters", {}))
    for key, section in data.items():
        if key != "/**" and _section_node(key) == node:
            out.update((section or {}).get("ros__parameters", {}))
    return out


def plant_file_of(plant: str) -> str:
    """The ``plant_file`` value of a ``plant:=`` launch argument or ``--plant`` option: a shipped
    plant's NAME as its ``package://`` URL, an existing relative path made absolute (the nodes
    may run elsewhere), anything else as given (the nodes' loader says what is wrong with it)."""
    text = str(plant).strip()
    if not text:
        raise ValueError("plant is empty: give a shipped plant NAME or a plant file")
    if "/" not in text and not text.endswith((".yaml", ".yml")):
        return f"package://scpo_ros/config/plants/{text}.yaml"
    if "://" not in text and Path(text).exists():
        return str(Path(text).resolve())
    return text


def compare_params_file(params_file: str | Path, safeguard_file: str | Path, overrides: dict[str, dict],
                        out: str | Path) -> str:
    """The parameter file of the side-by-side run: the SCPO graph's YAML, the safeguard's
    section, ``overrides``, and the simulator's ``plant_file`` copied into the safeguard's
    section, so its safe set is computed for the plant it guards."""
    merged_params_file(params_file, overrides, out, extra=[safeguard_file])
    data = yaml.safe_load(Path(out).read_text())
    sim = node_parameters(data, SIMULATOR)
    if "plant_file" in sim:
        merge_params(data, {SAFEGUARD: {"plant_file": sim["plant_file"]}})
    Path(out).write_text(yaml.safe_dump(data, sort_keys=False))
    return str(out)
