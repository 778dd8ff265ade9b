"""A node's ``main()``: executor, signals, the shutdown hold and the SUMMARY line; timers on
the steady clock, ROS time, lifecycle autostart.

Exit code 0 on SIGINT or SIGTERM (rclpy raises ``KeyboardInterrupt`` or
``ExternalShutdownException``), 1 when the node could not be built (bad parameter file,
uncertifiable configuration).

Executor: ``rclpy.experimental.EventsExecutor`` by default. It runs subscriptions, timers,
services and the lifecycle services of ``LifecycleNode`` in one thread, and its dispatch
overhead is a fraction of the default ``SingleThreadedExecutor``'s (one-way JointState
120 µs vs 185–250 µs between two processes, see BENCHMARKS.md).
``SCPO_ROS_EXECUTOR=single|multi|events`` overrides it (e.g. to compare).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable

import rclpy
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node

AUTOSTART_DELAY_S = 0.001
"""``autostart`` configures from a timer this soon after the node is built: the node's
constructor has returned and the executor runs the transitions (their services and
publishers work as for a lifecycle manager's request)."""


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


def autostart(node) -> None:
    """Configure, then activate ``node`` (a ``LifecycleNode``) once, from a short steady
    timer: the lifecycle without a manager. Activation follows only a successful
    configuration; a failed one leaves the node unconfigured (its ``on_configure`` says why)."""
    from rclpy.lifecycle import TransitionCallbackReturn

    started = []

    def start() -> None:
        node.destroy_timer(timer)
        if started:   # a short timer can fire again before its destruction takes effect
            return
        started.append(True)
        if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            node.trigger_activate()

    timer = steady_timer(node, AUTOSTART_DELAY_S, start)


def spin_until(node: Node, spin_once: Callable[[], None], done: Callable[[], bool], timeout_s: float) -> None:
    """``spin_once()`` until ``done()``, ``timeout_s`` on the steady clock or the end of the
    node's context: the loop of a controller's ``shutdown_hold``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and node.context.ok():
        spin_once()
        if done():
            break


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


def print_summary(node) -> None:
    """The node's one machine-readable shutdown line, ``SUMMARY {json}`` on stdout (the demo
    and the tests parse it), for a node with a ``summary()`` method."""
    summary = getattr(node, "summary", None)
    if summary is None:
        return
    try:
        print("SUMMARY " + json.dumps(summary()), flush=True)
    except Exception as exc:  # keep shutting down
        print(f"[WARN] summary: {exc}", file=sys.stderr)


def run_node(node_factory: Callable[[], Node], args: list[str] | None = None, executor: str | None = None) -> int:
    """Init rclpy, build the node, spin until SIGINT/SIGTERM, shut down cleanly.

    Returns the process exit code: 0 after a signal, 1 if the node could not be built.
    ``node_factory`` is called after ``rclpy.init`` so it can parse ``--ros-args``.
    A node with a ``shutdown_hold(spin_once)`` method gets to keep the executor spinning
    after the signal (a controller answering states with its fallback until the plant is
    at rest). Then a node with a ``summary()`` method gets its SUMMARY line printed
    (``print_summary``), then ``destroy_node``.

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
            print_summary(node)
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
