"""``plant_sim``: the plant of a plant file, simulated (any plant: linear or a model class).

Every ``1/rate_hz`` s (wall clock; ``rate_hz: 0`` = ``1/dt``, real time) it integrates the
held command over the file's ``dt`` (``Plant.step``: the discrete model the certificates are
computed for, or the model class's own step; optional process noise on the inputs) and
publishes the state through the file's ``joints:`` map.

Topics (relative names, so a namespace applies):
- ``joint_states`` (out, ``sensor_msgs/JointState``): the joints of ``joints:``, each state in
  its field, stamped. A field that one joint maps and another does not is NaN for the other.
- ``cmd`` (in, ``std_msgs/Float64MultiArray``): one value per input, in the file's ``inputs:``
  order (ros2_control's forward command convention). The last command is held. Commands of
  the wrong length or with NaN/Inf are refused (counted, logged); the previous one is kept.
- ``constraint_violation`` (out, ``std_msgs/String``, JSON): one message per simulated step
  whose state or command breaks a constraint of the file (``Plant.violations``, tolerance 0):
  ``{"step", "stamp", "kinds", "state", "command", "total"}``; ``kinds`` are the constraint
  names (state and input names, ``H``, ``G``).
- ``plant`` (out, ``std_msgs/String`` JSON, latched): ``plant.plant_record`` of the simulated
  plant and ``"node": "plant_sim"``, so that a bag carries the plant (the analysis reads it).
- ``/clock`` (out, ``rosgraph_msgs/Clock``, only with ``publish_clock``): see below.
- ``/diagnostics``: ``plant_sim: plant``, ERROR once any violation happened, with the
  counters (per constraint), the plant's name and digest, ``cmd_timeout_active`` and
  ``late_commands``.

Command watchdog (``cmd_timeout``, ``cmd_timeout_action``). This is the plant's own
watchdog, the drive's "no command" reaction: while the controller is dead (a crashed or
deactivated safety node, a cut cable) nothing else protects the plant. After
``cmd_timeout`` s without a command (counted from the start of stepping when no command
ever came) the command becomes
- ``brake`` (default): the file's backup LQR toward rest where the plant is (the reference
  is the tracked states' present values, clipped into their limits), clipped into the input
  limits (``brake_command``). Best effort: a plant whose rest there needs more than its
  inputs give (a DC motor at a speed its current limit cannot hold) gets the nearest
  admissible command, and a plant that cannot stop inside its limits still leaves them;
- ``zero``: a zero command.
The first command that arrives again takes over at once. Engaging and releasing are logged.

Simulated time (``publish_clock``). The simulator steps on its wall-clock timer and never
runs on simulated time itself (``use_sim_time: true`` is refused at start and at runtime).
With ``publish_clock`` it publishes ``/clock`` with the simulated time (the sum of ``dt``
over the steps, from 0) before the state of the same step, and stamps the states (and the
violation records) with it. ``/clock`` QoS: reliable, keep last 1, volatile; it matches
rclpy's and rclcpp's ``TimeSource`` subscription (best effort, depth 1) and reliable
subscribers alike.

Fault injection (``late_command_probability``): at a tick where a new command arrived since
the previous tick, with this probability the new command is not applied yet and the one
applied at the previous tick is held once more (a late or missed command, the fault the
nodes' safe set is built to absorb once). Never two ticks in a row. Its own generator,
seeded by ``seed`` (the noise sequence does not change), counted as ``late_commands``.

Episodes (``episode_s``, plants without tracked states only): the expert's references move
a tracking plant around its certified region; a plant without tracked states (the pendulum,
the cart-pole) would rest at its equilibrium and give nothing to learn. So it starts away
from it (``initial_state``) and again every ``episode_s`` of simulated time (counted as
``episodes``); the published states show the jump like any state.

The true plant (``true_plant_file``, ``model_mismatch``, ``disturbance``): the robot a model is
about differs from it. The simulator integrates ``true_plant_file`` when given (a plant file of
the same states and inputs; ``plant_file`` stays the model whose limits are counted), else the
model itself moved ``model_mismatch`` times its declared uncertainty
(``uncertainty.mismatched_plant``: 1 = at the edge of what the file declares, 2 = twice as far),
plus an additive disturbance per step: ``bounded`` (a random corner of the box
``disturbance_scale × w_max`` each step, the worst case for a polytope), ``uniform`` in that box,
or ``gaussian`` (σ = ``disturbance_scale × w_max / 2``, unbounded); ``w_max`` is the file's
declared ``uncertainty.w_max``, or ``disturbance_w_max`` when given. Seeded by ``seed``.

Service ``~/reset`` (``std_srvs/Trigger``, private: ``/plant_sim/reset``): state back to the
initial state, command to zero (counters and the simulated time keep counting).

Parameters: ``plant_file`` (read-only, the same as every node's) and the simulator's own
(``SIM_PARAMS``). The simulator integrates the file's plant, never a tightened one: the
runtime ``*_tight`` limits belong to the controllers.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger

from .. import graph as g
from ..backup import LQRBackup
from ..inputs import JointMap
from ..params import PLANT_FILE, SEED, ParamSpec, compose
from ..plant import Plant, load_plant, plant_record
from ..ros.diagnostics import ERROR, OK, WARN, Diagnostics
from ..ros.messages import stamp_to_sec
from ..ros.parameters import add_parameter_validator, declare_parameters
from ..ros.qos import CONTROL_QOS, EVENT_QOS, LATCHED_QOS
from ..ros.runner import flush_publishers, run_node
from ..uncertainty import mismatched_plant

SIM_PARAMS = (
    ParamSpec("rate_hz", 0.0, "Simulation and state publication rate (wall clock); 0 = 1/dt of the plant "
                              "(real time), at most max_rate_hz.", 0.0, 1000.0),
    ParamSpec("max_rate_hz", 0.0, "Cap of rate_hz = 0 (0: none): a plant with a shorter dt then runs slower than "
                                  "real time, for a machine that cannot keep its loop.", 0.0, 1000.0),
    ParamSpec("noise_std", 0.0, "Std of the process noise added to the applied inputs, as a fraction of each "
                                "input's half range (u_max - u_min) / 2.", 0.0, 10.0),
    dataclasses.replace(SEED, description="Seed of the process noise and of the late-command fault injection."),
    ParamSpec("initial_state", [], "Initial state: one value per state (or one for all); []: the equilibrium of "
                                   "the certified reference box's centre (without tracked states: the certified "
                                   "region's centre moved halfway to its upper corner).", -1e6, 1e6,
              ptype="double[]", max_len=64),
    ParamSpec("episode_s", 8.0, "Plants without tracked states only (no reference moves them): every episode_s of "
                                "simulated time the state starts again from initial_state; 0: never.", 0.0, 3600.0),
    ParamSpec("cmd_timeout", 0.5, "Seconds without a command after which cmd_timeout_action applies "
                                  "(0 = hold the last command forever).", 0.0, 60.0),
    ParamSpec("cmd_timeout_action", "brake", "After cmd_timeout: brake = the backup LQR toward rest where the "
                                             "plant is, within the input limits; zero = zero command.",
              choices=("zero", "brake")),
    ParamSpec("publish_clock", False, "Publish /clock with the simulated time (the sum of dt from 0) and stamp "
                                      "the states with it.", read_only=True),
    ParamSpec("late_command_probability", 0.0, "Fault injection: probability that a tick holds the previous "
                                               "command once more instead of the new one (never twice in a row).",
              0.0, 1.0),
    ParamSpec("wait_for_subscribers", 0, "Do not start stepping before this many subscriptions to joint_states "
                                         "are matched (a recorder or controller that must see the first state).",
              0, 64),
    ParamSpec("frame_id", "", "header.frame_id of the published states."),
    ParamSpec("true_plant_file", "", "The plant actually simulated (same states and inputs as plant_file); '': the "
                                     "model of plant_file, moved by model_mismatch.", read_only=True),
    ParamSpec("model_mismatch", 0.0, "The simulated plant differs from plant_file's model by this many times its "
                                     "declared uncertainty (1: at its edge; > 1: beyond). Ignored with "
                                     "true_plant_file.", 0.0, 100.0),
    ParamSpec("disturbance", "none", "Additive disturbance per step: bounded (a random corner of the box), uniform "
                                     "(in the box), gaussian (sigma = half the box).",
              choices=("none", "bounded", "uniform", "gaussian")),
    ParamSpec("disturbance_scale", 1.0, "The disturbance box as a multiple of w_max.", 0.0, 100.0),
    ParamSpec("disturbance_w_max", [], "Per state: the disturbance's w_max; []: the plant file's declared "
                                       "uncertainty.w_max.", 0.0, 1e6, ptype="double[]", max_len=64),
)
PARAMS = compose((PLANT_FILE,), SIM_PARAMS)


CLOCK_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                       durability=DurabilityPolicy.VOLATILE)
"""``/clock``: keep last 1 like ROS's ClockQoS. A reliable writer serves the best-effort,
depth-1 reader of rclpy's/rclcpp's TimeSource and reliable readers (recorders, tests) alike;
keep-last 1 never blocks the step on a slow reader."""


def brake_command(plant: Plant, backup: LQRBackup, x: np.ndarray) -> np.ndarray:
    """The watchdog's brake: the backup LQR toward the equilibrium of the tracked states'
    present values (clipped into their limits: rest where the plant is, not back at the
    certified region), clipped into the input box and, for an input polytope ``G u <= g``,
    pulled toward ``u_ss`` of that reference (clipped into the box) until it holds, or onto
    ``u_ss`` itself when that point breaks it too (the file then has no admissible rest there)."""
    idx = plant.tracked_index
    r = np.clip(x[idx], plant.x_min[idx], plant.x_max[idx])
    u = np.clip(backup(x, r), plant.u_min, plant.u_max)
    if plant.G.size and np.any(plant.G @ u > plant.g):
        u_ss = np.clip(backup.equilibrium(r)[1], plant.u_min, plant.u_max)
        lo, hi = 0.0, 1.0                        # u_ss + s (u - u_ss) is admissible at s = lo
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if np.all(plant.G @ (u_ss + mid * (u - u_ss)) <= plant.g):
                lo = mid
            else:
                hi = mid
        u = u_ss + lo * (u - u_ss)
    return u


def initial_state(plant: Plant, values: list[float]) -> np.ndarray:
    """The ``initial_state`` parameter as a state: [] = the equilibrium of the reference box's
    centre (a plant without tracked states: the certified region's centre moved halfway to
    its upper corner, a state the controllers have to bring back), one value = every state,
    else one value per state."""
    if len(values) == 0:
        if plant.nr == 0:
            reg = plant.region
            centre = 0.5 * (reg.x_min + reg.x_max)
            return centre + 0.25 * (reg.x_max - reg.x_min)
        return plant.equilibrium(0.5 * (plant.region.r_min + plant.region.r_max))[0]
    if len(values) == 1:
        return np.full(plant.n, float(values[0]))
    if len(values) != plant.n:
        raise ValueError(f"initial_state has {len(values)} entries, the plant {plant.name} has {plant.n} states "
                         f"{list(plant.states)}")
    return np.asarray(values, dtype=float)


def _ns_to_time(ns: int) -> Time:
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


class PlantSim(Node):
    def __init__(self, **kwargs):
        super().__init__(g.SIMULATOR, **kwargs)
        if self.get_parameter("use_sim_time").value:
            raise ValueError("use_sim_time is true, but plant_sim steps on its wall-clock timer and is itself the "
                             "source of simulated time (publish_clock): run it with use_sim_time:=false")
        self.p = declare_parameters(self, PARAMS)
        self.plant = load_plant(self.p["plant_file"])
        self.true_plant = self._true_plant(self.p)
        self.w_max = self._w_max(self.p)
        self.backup = LQRBackup(self.plant)
        self.joint_map = JointMap.for_plant(self.plant)
        self.noise_scale = 0.5 * (self.plant.u_max - self.plant.u_min)
        self.x0 = initial_state(self.plant, self.p["initial_state"])
        self.x = self.x0.copy()
        m = self.plant.m
        self.u = np.zeros(m)
        self.u_pending = np.zeros(m)            # newest command received since the last tick
        self.rng = np.random.default_rng(self.p["seed"])
        self.late_rng = self._late_rng(self.p["seed"])
        self.w_rng = np.random.default_rng([int(self.p["seed"]), 2])
        self.new_cmd = False
        self.last_tick_late = False
        self.late_commands = 0
        self.timeout_active = False
        self.sim_time_ns = 0                    # simulated time of the current state
        self.dt_ns = int(round(self.plant.dt * 1e9))
        self.episodes = 0
        self.episode_steps = self._episode_steps(self.p)
        self.steps = 0
        self.states_published = 0
        self.violations = 0
        self.violations_by_kind = {k: 0 for k in self.plant.violations(self.x, self.u)}
        self.refused_commands = 0
        self.commands = 0
        self.last_cmd_time = None
        self.started = self.p["wait_for_subscribers"] == 0
        self.start_time = time.monotonic()      # the watchdog counts from here until a first command comes

        self.state_pub = self.create_publisher(JointState, g.JOINT_STATES, CONTROL_QOS)
        self.violation_pub = self.create_publisher(String, g.CONSTRAINT_VIOLATION, EVENT_QOS)
        self.plant_pub = self.create_publisher(String, g.PLANT, LATCHED_QOS)
        self.plant_pub.publish(String(data=json.dumps({**plant_record(self.plant), "node": g.SIMULATOR})))
        self.clock_pub = self.create_publisher(Clock, g.CLOCK, CLOCK_QOS) if self.p["publish_clock"] else None
        self.create_subscription(Float64MultiArray, g.CMD, self._on_cmd, CONTROL_QOS)
        self.create_service(Trigger, g.RESET_SERVICE, self._on_reset)
        self.diag = Diagnostics(self)
        add_parameter_validator(self, PARAMS, check=self._check, apply=self._apply)
        self.add_on_set_parameters_callback(self._refuse_sim_time)
        self.timer = self.create_timer(self._period(self.p), self._step)
        self._update_diagnostics()
        self.get_logger().info(
            f"plant {self.plant.name} ({self.plant.source}): {self.plant.n} states {list(self.plant.states)}, "
            f"{m} inputs {list(self.plant.inputs)}, dt={self.plant.dt:g} s at {1.0 / self._period(self.p):g} Hz, "
            f"cmd_timeout={self.p['cmd_timeout']:g} s ({self.p['cmd_timeout_action']})"
            + (", publishing /clock" if self.clock_pub is not None else "")
            + (f", late_command_probability={self.p['late_command_probability']:g}"
               if self.p["late_command_probability"] > 0.0 else "")
            + (f", simulating {self.true_plant.name}" if self.true_plant is not self.plant else "")
            + (f", disturbance {self.p['disturbance']} x{self.p['disturbance_scale']:g} of w_max "
               f"{self.w_max.tolist()}" if self.p["disturbance"] != "none" else ""))

    # -- parameters
    def _true_plant(self, p) -> Plant:
        """The plant integrated: ``true_plant_file``, else the model moved by ``model_mismatch``."""
        if p["true_plant_file"]:
            true = load_plant(p["true_plant_file"])
            if true.states != self.plant.states or true.inputs != self.plant.inputs:
                raise ValueError(f"true_plant_file {true.source} has states {list(true.states)} and inputs "
                                 f"{list(true.inputs)}; plant_file has {list(self.plant.states)} and "
                                 f"{list(self.plant.inputs)}")
            return true
        if p["model_mismatch"] > 0.0:
            return mismatched_plant(self.plant, p["model_mismatch"], p["seed"])
        return self.plant

    def _w_max(self, p) -> np.ndarray:
        w = p["disturbance_w_max"]
        if len(w) == 0:
            return np.asarray(self.plant.uncertainty.w_max, dtype=float)
        if len(w) == 1:
            return np.full(self.plant.n, float(w[0]))
        if len(w) != self.plant.n:
            raise ValueError(f"disturbance_w_max has {len(w)} entries, the plant {self.plant.name} has "
                             f"{self.plant.n} states")
        return np.asarray(w, dtype=float)

    def _disturbance(self) -> np.ndarray | None:
        kind = self.p["disturbance"]
        if kind == "none" or not self.w_max.any():
            return None
        box = self.p["disturbance_scale"] * self.w_max
        if kind == "bounded":
            return self.w_rng.choice([-1.0, 1.0], size=box.size) * box
        if kind == "uniform":
            return self.w_rng.uniform(-1.0, 1.0, size=box.size) * box
        return 0.5 * box * self.w_rng.standard_normal(box.size)

    def _episode_steps(self, p) -> int:
        """Steps per episode: 0 (never) for a plant with tracked states or ``episode_s`` 0."""
        if self.plant.nr or p["episode_s"] <= 0.0:
            return 0
        return max(1, int(round(p["episode_s"] / self.plant.dt)))

    def _period(self, p) -> float:
        if p["rate_hz"] > 0.0:
            return 1.0 / p["rate_hz"]
        return max(self.plant.dt, 1.0 / p["max_rate_hz"]) if p["max_rate_hz"] > 0.0 else self.plant.dt

    @staticmethod
    def _late_rng(seed: int) -> np.random.Generator:
        # its own stream: switching the fault injection on does not change the noise sequence
        return np.random.default_rng([int(seed), 1])

    def _refuse_sim_time(self, params) -> SetParametersResult:
        for p in params:
            if p.name == "use_sim_time" and p.value is True:
                reason = "use_sim_time is refused: plant_sim steps on the wall clock and publishes /clock"
                self.get_logger().warning(f"parameter change rejected: {reason}")
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _check(self, values) -> str | None:
        try:
            initial_state(self.plant, values["initial_state"])
            self._w_max(values)
        except ValueError as exc:
            return str(exc)
        return None

    def _apply(self, values, changed) -> None:
        self.p = values
        self.x0 = initial_state(self.plant, values["initial_state"])
        self.w_max = self._w_max(values)
        if changed & {"model_mismatch", "seed"} and not values["true_plant_file"]:
            self.true_plant = self._true_plant(values)
            self.get_logger().warning(f"simulating {self.true_plant.name}")
        self.episode_steps = self._episode_steps(values)
        if changed & {"rate_hz", "max_rate_hz"}:
            self.destroy_timer(self.timer)
            self.timer = self.create_timer(self._period(values), self._step)
        if "seed" in changed:
            self.rng = np.random.default_rng(values["seed"])
            self.late_rng = self._late_rng(values["seed"])
            self.w_rng = np.random.default_rng([int(values["seed"]), 2])
        self.get_logger().info(f"parameters changed: {sorted(changed)}")
        self._update_diagnostics()

    # -- callbacks
    def _on_cmd(self, msg: Float64MultiArray) -> None:
        u = np.asarray(msg.data, dtype=float)
        if u.size != self.plant.m or not np.isfinite(u).all():
            self.refused_commands += 1
            self.get_logger().error(f"refused command {list(msg.data)[:8]}: need {self.plant.m} finite values "
                                    f"{list(self.plant.inputs)}", throttle_duration_sec=1.0)
            return
        # applied at the next tick (or, with the fault injection, the one after)
        self.u_pending[:] = u
        self.new_cmd = True
        self.commands += 1
        self.last_cmd_time = time.monotonic()

    def _on_reset(self, request, response):
        self.x = self.x0.copy()
        self.u[:] = 0.0
        self.new_cmd = False
        response.success = True
        response.message = f"state reset to {self.x0.tolist()}"
        self.get_logger().info(response.message)
        return response

    def _step(self) -> None:
        if not self.started:
            if self.state_pub.get_subscription_count() < self.p["wait_for_subscribers"]:
                return
            self.started = True
            self.start_time = time.monotonic()
            self.get_logger().info(f"{self.state_pub.get_subscription_count()} subscribers matched: starting")
            self._publish_state()  # x_0: nothing has answered a state yet, so nothing to integrate
            self._check_violation(self.x, None)
            return
        self._update_command()
        # The held command answers the state published last tick: integrate with it
        # (x_{k+1} = f(x_k, u_k), zero-order hold), then publish x_{k+1} for the next command.
        # Publishing first would apply every command one step late, which is not the model
        # the SCPO certificate and the safeguard's safe set are computed for.
        applied = self.u
        if self.p["noise_std"] > 0.0:
            applied = self.u + self.p["noise_std"] * self.noise_scale * self.rng.standard_normal(self.plant.m)
        self.x = np.asarray(self.true_plant.step(self.x, applied), dtype=float)
        w = self._disturbance()
        if w is not None:
            self.x += w
        self.steps += 1
        self.sim_time_ns += self.dt_ns
        if self.episode_steps and self.steps % self.episode_steps == 0:
            self.x = self.x0.copy()      # a new episode (a plant that no reference moves)
            self.episodes += 1
        self._publish_state()
        self._check_violation(self.x, self.u)  # every published state, and the command that led to it
        if self.steps % max(1, int(round(1.0 / self._period(self.p)))) == 0:
            self._update_diagnostics()

    def _update_command(self) -> None:
        """The command this tick applies: the newest one received, held once more by the
        fault injection, or the watchdog's action after ``cmd_timeout`` s without one."""
        if self.new_cmd:
            if self.timeout_active:
                self.timeout_active = False
                self.get_logger().info("command received again: watchdog released")
                self._update_diagnostics()
            prob = self.p["late_command_probability"]
            if prob > 0.0 and not self.last_tick_late and self.late_rng.random() < prob:
                self.late_commands += 1   # keep self.u (the previous command) one tick more
                self.last_tick_late = True
            else:
                self.u[:] = self.u_pending
                self.new_cmd = False
                self.last_tick_late = False
            return
        self.last_tick_late = False
        timeout = self.p["cmd_timeout"]
        last = self.last_cmd_time if self.last_cmd_time is not None else self.start_time
        if timeout <= 0.0 or time.monotonic() - last <= timeout:
            return
        action = self.p["cmd_timeout_action"]
        if not self.timeout_active:
            self.timeout_active = True
            self.get_logger().warning(f"no command for {timeout:g} s: watchdog engaged, "
                                      + ("braking to rest" if action == "brake" else "command set to zero"))
            self._update_diagnostics()
        if action == "brake":
            self.u[:] = brake_command(self.plant, self.backup, self.x)
        else:
            self.u[:] = 0.0

    def _stamp(self) -> Time:
        if self.clock_pub is not None:
            return _ns_to_time(self.sim_time_ns)
        return self.get_clock().now().to_msg()

    def _publish_state(self) -> None:
        if self.clock_pub is not None:
            # the clock first: a node on simulated time has the new time when the state arrives
            self.clock_pub.publish(Clock(clock=_ns_to_time(self.sim_time_ns)))
        msg = JointState()
        msg.header.stamp = self._stamp()
        msg.header.frame_id = self.p["frame_id"]
        msg.name, msg.position, msg.velocity, msg.effort = self.joint_map.write(self.x)
        self.state_pub.publish(msg)
        self.states_published += 1

    def _check_violation(self, x: np.ndarray, u: np.ndarray | None) -> None:
        # strict (tol 0): the plant counts any overshoot of its limits, rounding included
        kinds = [kind for kind, bad in self.plant.violations(x, u, tol=0.0).items() if bad]
        if not kinds:
            return
        self.violations += 1
        for k in kinds:
            self.violations_by_kind[k] += 1
        now = self._stamp()
        self.violation_pub.publish(String(data=json.dumps({
            "step": self.steps, "stamp": stamp_to_sec(now), "kinds": kinds, "state": x.tolist(),
            "command": [] if u is None else u.tolist(), "total": self.violations})))
        self.get_logger().error(f"constraint violation #{self.violations} at step {self.steps}: {kinds}, "
                                f"x={np.round(x, 4).tolist()}"
                                + ("" if u is None else f", u={np.round(u, 4).tolist()}"),
                                throttle_duration_sec=1.0)
        self._update_diagnostics()

    def _update_diagnostics(self) -> None:
        level = ERROR if self.violations else (WARN if self.refused_commands else OK)
        msg = (f"{self.violations} constraint violations" if self.violations else
               f"{self.refused_commands} commands refused" if self.refused_commands else "within limits")
        self.diag.update("plant", level, msg, plant=self.plant.name, digest=self.plant.digest[:16],
                         steps=self.steps, constraint_violations=self.violations,
                         violations_by_kind=self.violations_by_kind, commands=self.commands,
                         refused_commands=self.refused_commands, dt=self.plant.dt,
                         rate_hz=1.0 / self._period(self.p), cmd_timeout_active=self.timeout_active,
                         cmd_timeout_action=self.p["cmd_timeout_action"], late_commands=self.late_commands,
                         episodes=self.episodes, simulated=self.true_plant.name, disturbance=self.p["disturbance"])

    def summary(self) -> dict:
        return {"node": g.SIMULATOR, "plant": self.plant.name, "steps": self.steps,
                "states_published": self.states_published, "constraint_violations": self.violations,
                "violations_by_kind": self.violations_by_kind, "commands": self.commands,
                "refused_commands": self.refused_commands, "late_commands": self.late_commands,
                "episodes": self.episodes}

    def destroy_node(self):
        flush_publishers([pub for pub in (self.state_pub, self.violation_pub, self.plant_pub, self.clock_pub)
                          if pub is not None])
        self._update_diagnostics()
        self.diag.publish()
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(PlantSim, args)


if __name__ == "__main__":
    sys.exit(main())
