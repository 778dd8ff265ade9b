"""Shared rclpy helpers for every scpo_ros node.

- ``ParamSpec`` / ``declare_parameters`` / ``add_parameter_validator``: every tunable is
  declared with a ``ParameterDescriptor`` (description, ``FloatingPointRange`` /
  ``IntegerRange``, read-only flag), and runtime changes are validated with a reason.
- ``Diagnostics``: ``diagnostic_msgs/DiagnosticArray`` on ``/diagnostics`` (status name
  ``"<node>: <task>"``, ``hardware_id``, stamped header), published about once a second
  and immediately when a task's level changes. ``diagnostic_updater`` is not on PyPI.
- Message conversions: ``JointState`` <-> ``x = [p_1..p_dof, v_1..v_dof]``,
  ``Float64MultiArray`` <-> numpy, and the weight-vector convention (``weights_to_msg``).
- ``make_executor`` / ``run_node``: the ``main()`` of every node. Exit code 0 on SIGINT or
  SIGTERM (rclpy raises ``KeyboardInterrupt`` or ``ExternalShutdownException``), 1 when
  the node could not be built (bad parameter file, uncertifiable configuration).

Executor: ``rclpy.experimental.EventsExecutor`` by default. It runs subscriptions, timers,
services and the lifecycle services of ``LifecycleNode`` in one thread, and its
dispatch overhead is a fraction of the default ``SingleThreadedExecutor``'s (one-way
JointState 120 µs vs 185–250 µs between two processes, see docs/performance.md).
``SCPO_ROS_EXECUTOR=single|multi|events`` overrides it (e.g. to compare).
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType,
                                SetParametersResult)
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, MultiArrayDimension

# ----------------------------------------------------------------------------- QoS

CONTROL_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
"""State, command, reference, expert action: reliable, depth 10 (the transport numbers of
docs/performance.md were measured with this profile)."""

LATCHED_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
"""Last value for late joiners: certified weights, safety mode."""

EVENT_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
"""Sparse events that must not be dropped (decisions, violations)."""

STATE_QOS_CHOICES = ("reliable", "best_effort")


def state_qos(kind: str) -> QoSProfile:
    """The ``joint_states`` subscription profile of a controller (parameter ``state_qos``):
    ``reliable`` (CONTROL_QOS) or ``best_effort``, which also matches a best-effort sensor
    driver (a reliable subscription to a best-effort publisher gets nothing: DDS calls that
    incompatible QoS, and the nodes report it as a WARN diagnostic)."""
    if kind == "best_effort":
        return QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT, history=HistoryPolicy.KEEP_LAST)
    if kind == "reliable":
        return CONTROL_QOS
    raise ValueError(f"state_qos must be one of {STATE_QOS_CHOICES}, got {kind!r}")


def steady_timer(node: Node, period_s: float, callback):
    """A timer on the steady (monotonic) clock: it fires with ``use_sim_time`` too, whether or
    not anything publishes ``/clock`` (a ROS-time timer would stop, and a watchdog with it)."""
    return node.create_timer(period_s, callback, clock=Clock(clock_type=ClockType.STEADY_TIME))


def ros_now(node: Node) -> float | None:
    """The node's ROS time in seconds, or None when it runs on ``use_sim_time`` and no
    ``/clock`` has arrived yet (ROS time is then 0: nothing can be compared with it).

    Without sim time the ROS clock *is* the system clock: ``time.time()`` reads it without
    building an rclpy ``Time`` (a few µs on the control path)."""
    clock = node.get_clock()
    if not clock.ros_time_is_active:
        return time.time()
    ns = clock.now().nanoseconds
    return None if ns == 0 else ns * 1e-9

# ------------------------------------------------------------------------ parameters

_TYPE_NAMES = {
    ParameterType.PARAMETER_BOOL: "bool", ParameterType.PARAMETER_INTEGER: "int",
    ParameterType.PARAMETER_DOUBLE: "double", ParameterType.PARAMETER_STRING: "string",
    ParameterType.PARAMETER_DOUBLE_ARRAY: "double[]", ParameterType.PARAMETER_INTEGER_ARRAY: "int[]",
    ParameterType.PARAMETER_STRING_ARRAY: "string[]",
}


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter.

    ``default``'s Python type decides the ROS type (bool, int, float, str, or a list of
    float/int/str; give ``ptype`` for an empty list). ``min``/``max`` become the
    descriptor's range for scalars and are checked element-wise for arrays; ``choices``
    restricts strings; ``min_len``/``max_len`` bound array lengths.
    """

    name: str
    default: Any
    description: str
    min: float | int | None = None
    max: float | int | None = None
    choices: tuple[str, ...] | None = None
    read_only: bool = False
    ptype: int | None = None
    min_len: int = 0
    max_len: int | None = None

    @property
    def type(self) -> int:
        if self.ptype is not None:
            return self.ptype
        d = self.default
        if isinstance(d, bool):
            return ParameterType.PARAMETER_BOOL
        if isinstance(d, int):
            return ParameterType.PARAMETER_INTEGER
        if isinstance(d, float):
            return ParameterType.PARAMETER_DOUBLE
        if isinstance(d, str):
            return ParameterType.PARAMETER_STRING
        if isinstance(d, (list, tuple)) and d:
            first = d[0]
            if isinstance(first, bool):
                raise TypeError(f"{self.name}: bool arrays are not supported")
            if isinstance(first, int):
                return ParameterType.PARAMETER_INTEGER_ARRAY
            if isinstance(first, float):
                return ParameterType.PARAMETER_DOUBLE_ARRAY
            if isinstance(first, str):
                return ParameterType.PARAMETER_STRING_ARRAY
        raise TypeError(f"{self.name}: cannot infer the ROS type of {d!r}; give ptype")

    def descriptor(self) -> ParameterDescriptor:
        t = self.type
        constraints = []
        if self.choices:
            constraints.append("one of: " + ", ".join(self.choices))
        if t in (ParameterType.PARAMETER_DOUBLE_ARRAY, ParameterType.PARAMETER_INTEGER_ARRAY) and (
                self.min is not None or self.max is not None):
            constraints.append(f"every element in [{self.min}, {self.max}]")
        if self.min_len or self.max_len is not None:
            constraints.append(f"length in [{self.min_len}, {self.max_len if self.max_len is not None else 'inf'}]")
        desc = ParameterDescriptor(name=self.name, type=t, description=self.description,
                                   additional_constraints="; ".join(constraints), read_only=self.read_only)
        if t == ParameterType.PARAMETER_DOUBLE and self.min is not None and self.max is not None:
            desc.floating_point_range = [FloatingPointRange(from_value=float(self.min), to_value=float(self.max),
                                                            step=0.0)]
        elif t == ParameterType.PARAMETER_INTEGER and self.min is not None and self.max is not None:
            desc.integer_range = [IntegerRange(from_value=int(self.min), to_value=int(self.max), step=1)]
        return desc

    def check(self, value) -> str | None:
        """Reason why ``value`` is not acceptable, or None."""
        t = self.type
        if t == ParameterType.PARAMETER_DOUBLE or t == ParameterType.PARAMETER_INTEGER:
            values = [value]
        elif t in (ParameterType.PARAMETER_DOUBLE_ARRAY, ParameterType.PARAMETER_INTEGER_ARRAY,
                   ParameterType.PARAMETER_STRING_ARRAY):
            values = list(value)
            if len(values) < self.min_len or (self.max_len is not None and len(values) > self.max_len):
                return f"{self.name} needs between {self.min_len} and {self.max_len} entries, got {len(values)}"
            if t == ParameterType.PARAMETER_STRING_ARRAY:
                values = []
        else:
            values = []
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                return f"{self.name} must be finite, got {v}"
            if self.min is not None and v < self.min:
                return f"{self.name} = {v} is below its minimum {self.min}"
            if self.max is not None and v > self.max:
                return f"{self.name} = {v} is above its maximum {self.max}"
        if self.choices and value not in self.choices:
            return f"{self.name} = {value!r} is not one of {', '.join(self.choices)}"
        return None


def declare_parameters(node: Node, specs: Sequence[ParamSpec]) -> dict[str, Any]:
    """Declare every spec on ``node`` (overrides from ``--params-file``/``-p`` apply) and
    return the resulting values. Raises ``ValueError`` with the reason when an override
    is out of range (rclpy enforces descriptor ranges; arrays and choices are ours)."""
    for spec in specs:
        default = list(spec.default) if isinstance(spec.default, tuple) else spec.default
        node.declare_parameter(spec.name, default, spec.descriptor())
    values = parameter_values(node, specs)
    for spec in specs:
        reason = spec.check(values[spec.name])
        if reason:
            raise ValueError(f"parameter {reason}")
    return values


def parameter_values(node: Node, specs: Iterable[ParamSpec]) -> dict[str, Any]:
    """Current values as plain Python (arrays as lists)."""
    out = {}
    for spec in specs:
        v = node.get_parameter(spec.name).value
        out[spec.name] = list(v) if isinstance(v, (list, tuple, np.ndarray)) or type(v).__name__ == "array" else v
    return out


def add_parameter_validator(node: Node, specs: Sequence[ParamSpec],
                            check: Callable[[dict[str, Any]], str | None] | None = None,
                            apply: Callable[[dict[str, Any], set[str]], None] | None = None) -> None:
    """Validate runtime parameter changes, then apply them.

    Each changed value is checked against its spec (range, finiteness, choices, array
    length). Then ``check(values)`` sees *all* values as they would be after the change
    (for constraints between parameters) and returns a reason to reject, or None. A
    rejected change leaves every parameter as it was; the reason goes back to the caller
    (``ros2 param set`` prints it) and into the log. After an accepted change,
    ``apply(values, changed_names)`` runs (from the post-set callback, so it only ever
    sees values rclpy has stored).
    """
    by_name = {s.name: s for s in specs}

    def on_set(params) -> SetParametersResult:
        proposed = parameter_values(node, specs)
        for p in params:
            spec = by_name.get(p.name)
            if spec is None:
                continue
            if spec.read_only:
                return _reject(node, f"{p.name} is read-only")
            if p.type_ != spec.type:
                return _reject(node, f"{p.name} must be {_TYPE_NAMES.get(spec.type, spec.type)}, "
                                     f"got {_TYPE_NAMES.get(int(p.type_), p.type_)}")
            value = list(p.value) if not isinstance(p.value, (str, bool, int, float)) else p.value
            reason = spec.check(value)
            if reason:
                return _reject(node, reason)
            proposed[p.name] = value
        if check is not None:
            try:
                reason = check(proposed)
            except Exception as exc:  # a check that fails to run must reject, not crash the node
                reason = f"validation failed: {exc}"
            if reason:
                return _reject(node, reason)
        return SetParametersResult(successful=True)

    node.add_on_set_parameters_callback(on_set)
    if apply is not None:
        def on_post_set(params) -> None:
            names = {p.name for p in params if p.name in by_name}
            if names:
                apply(parameter_values(node, specs), names)
        node.add_post_set_parameters_callback(on_post_set)


def _reject(node: Node, reason: str) -> SetParametersResult:
    node.get_logger().warning(f"parameter change rejected: {reason}")
    return SetParametersResult(successful=False, reason=reason)


# ----------------------------------------------------------------------- diagnostics

OK, WARN, ERROR, STALE = (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR,
                          DiagnosticStatus.STALE)
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR", STALE: "STALE"}


class Diagnostics:
    """A minimal ``diagnostic_updater``: named tasks, each with a level, message and values.

    ``update(task, level, message, **values)`` stores a task's status; a timer publishes
    every task at ``period_s`` and a level change is published at once (an ERROR must not
    wait up to a second). Call from the node's executor thread, or from another thread:
    the state is guarded by a lock and ``publish`` is thread-safe in rclpy.
    """

    def __init__(self, node: Node, hardware_id: str | None = None, period_s: float = 1.0):
        self.node = node
        self.hardware_id = hardware_id or node.get_fully_qualified_name()
        self._pub = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._tasks: dict[str, DiagnosticStatus] = {}
        self._lock = threading.Lock()
        self._timer = steady_timer(node, period_s, self.publish)   # alive on use_sim_time without /clock

    def update(self, task: str, level: int, message: str, **values) -> None:
        status = DiagnosticStatus(level=level, name=f"{self.node.get_name()}: {task}", message=message,
                                  hardware_id=self.hardware_id,
                                  values=[KeyValue(key=k, value=_kv_text(v)) for k, v in values.items()])
        with self._lock:
            old = self._tasks.get(task)
            self._tasks[task] = status
        if old is None or old.level != status.level:
            self.publish()

    def level(self, task: str) -> int | None:
        with self._lock:
            s = self._tasks.get(task)
        return None if s is None else s.level

    def publish(self) -> None:
        with self._lock:
            statuses = list(self._tasks.values())
        if not statuses or not rclpy.ok(context=self.node.context):
            return
        msg = DiagnosticArray(status=statuses)
        msg.header.stamp = self.node.get_clock().now().to_msg()
        try:
            self._pub.publish(msg)
        except Exception:  # publishing during shutdown: nothing left to tell
            pass

    def destroy(self) -> None:
        self.node.destroy_timer(self._timer)
        self.node.destroy_publisher(self._pub)


def _kv_text(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    return str(v)


def diagnostic_values(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


# ------------------------------------------------------------------ message helpers

def axis_names(dof: int) -> list[str]:
    return [f"axis_{i}" for i in range(dof)]


def joint_state_msg(x: np.ndarray, dof: int, stamp, names: list[str] | None = None,
                    msg: JointState | None = None) -> JointState:
    """``JointState`` (one joint per axis, position and velocity) from ``x = [p, v]``."""
    msg = msg or JointState()
    msg.header.stamp = stamp
    msg.name = names or axis_names(dof)
    msg.position = x[:dof].tolist()
    msg.velocity = x[dof:2 * dof].tolist()
    return msg


def state_from_joint_state(msg: JointState, dof: int, out: np.ndarray | None = None) -> np.ndarray | None:
    """``x = [p_1..p_dof, v_1..v_dof]`` from a ``JointState``, or None when the message does
    not carry ``dof`` positions and velocities or holds a non-finite value. Joints are taken
    in message order (our sim publishes ``axis_0..axis_{dof-1}``). ``out`` avoids allocation."""
    if len(msg.position) < dof or len(msg.velocity) < dof:
        return None
    x = out if out is not None else np.empty(2 * dof)
    x[:dof] = msg.position[:dof]
    x[dof:] = msg.velocity[:dof]
    if not np.isfinite(x).all():
        return None
    return x


def float64_msg(values, label: str | None = None) -> Float64MultiArray:
    """``Float64MultiArray`` with the values; ``label`` goes into ``layout.dim[0].label``."""
    msg = Float64MultiArray()
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    msg.data = data.tolist()
    if label is not None:
        msg.layout.dim = [MultiArrayDimension(label=label, size=data.size, stride=data.size)]
    return msg


def array_from_float64(msg: Float64MultiArray) -> np.ndarray:
    return np.asarray(msg.data, dtype=np.float64)


def weights_to_msg(flat, fingerprint: str) -> Float64MultiArray:
    """Weight-vector convention: ``data`` = flat weights in ``MLPLayout``'s order,
    ``layout.dim[0].label`` = ``MLPLayout.fingerprint`` (16 hex digits), ``size`` = length."""
    return float64_msg(flat, label=fingerprint)


def weights_from_msg(msg: Float64MultiArray) -> tuple[np.ndarray, str | None]:
    """(flat weights, fingerprint or None when the message carries no layout)."""
    label = msg.layout.dim[0].label if msg.layout.dim else None
    return np.asarray(msg.data, dtype=np.float64), label


def flush_publishers(publishers, timeout_s: float = 1.0) -> None:
    """Wait (bounded) until every reliable subscriber acknowledged what was published.

    Call before a node goes away: the last messages of a process that exits right after
    publishing can otherwise be lost for a reader whose first copy was dropped.
    """
    from rclpy.duration import Duration
    for pub in publishers:
        try:
            pub.wait_for_all_acked(Duration(seconds=timeout_s))
        except Exception:  # a destroyed publisher or a shut down context: nothing to flush
            pass


def stamp_to_sec(stamp) -> float:
    return stamp.sec + 1e-9 * stamp.nanosec


# ------------------------------------------------------------------- main / executor

def make_executor(kind: str | None = None, context=None):
    """``events`` (default), ``single`` or ``multi`` (``SCPO_ROS_EXECUTOR`` overrides None)."""
    kind = kind or os.environ.get("SCPO_ROS_EXECUTOR", "events")
    if kind == "events":
        from rclpy.experimental import EventsExecutor
        return EventsExecutor(context=context)
    if kind == "single":
        return SingleThreadedExecutor(context=context)
    if kind == "multi":
        return MultiThreadedExecutor(num_threads=2, context=context)
    raise ValueError(f"unknown executor {kind!r} (events, single, multi)")


def spin(executor, context=None, stop: Callable[[], bool] | None = None) -> None:
    """Spin until the context shuts down (or ``stop()`` is true).

    A loop of ``spin_once`` rather than ``executor.spin()``: with the EventsExecutor of
    the rclpy 9.1 wheels, ``spin()`` keeps the GIL while it waits, so timers, other
    Python threads (the SCPO worker) and the shutdown wake-up never run.
    """
    context = context or rclpy.get_default_context()
    while context.ok() and not (stop is not None and stop()):
        executor.spin_once(timeout_sec=0.1)


def run_node(node_factory: Callable[[], Node], args: list[str] | None = None, executor: str | None = None) -> int:
    """Init rclpy, build the node, spin until SIGINT/SIGTERM, shut down cleanly.

    Returns the process exit code: 0 after a signal, 1 if the node could not be built.
    ``node_factory`` is called after ``rclpy.init`` so it can parse ``--ros-args``.
    A node with a ``shutdown_hold(spin_once)`` method gets to keep the executor spinning
    after the signal (a controller answering states with its fallback until the plant is
    at rest) before ``destroy_node``.

    Signals only set a flag that the spin loop checks every 0.1 s: a ``KeyboardInterrupt``
    raised while the C++ executor is inside a Python callback comes out as a bare
    ``RuntimeError`` from pybind11, and the node would exit with 1 instead of 0.
    """
    from rclpy.signals import SignalHandlerOptions

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    rclpy.init(args=args if args is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    node = None
    ex = None
    try:
        try:
            node = node_factory()
        except (ValueError, TypeError, RuntimeError) as exc:
            # rclpy's parameter exceptions subclass these; a clear line beats a traceback
            print(f"[FATAL] cannot start: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return 1
        ex = make_executor(executor)
        ex.add_node(node)
        spin(ex, node.context, stop=lambda: stop["signal"] is not None)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        # A terminal's Ctrl-C reaches the node and, through launch, a second time:
        # do not let the second one cut the clean shutdown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        hold = getattr(node, "shutdown_hold", None)
        if hold is not None and ex is not None and node.context.ok():
            try:
                hold(lambda: ex.spin_once(timeout_sec=0.02))
            except Exception as exc:  # keep shutting down
                print(f"[WARN] shutdown_hold: {exc}", file=sys.stderr)
        if node is not None:
            try:
                node.destroy_node()
            except Exception as exc:  # keep shutting down
                print(f"[WARN] destroy_node: {exc}", file=sys.stderr)
        if ex is not None:
            try:
                ex.shutdown(timeout_sec=1.0)
            except Exception:
                pass
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            if sig != signal.SIGINT:
                signal.signal(sig, handler)
    return 0



def monotonic() -> float:
    return time.monotonic()
