"""Issue 9, written as an attacker would: scpo_safety_node over real DDS, one or more attacks
per finding (unbounded states, starts outside the certified region, references, state input
by name and stamp, lifecycle, clocks, parameters, proposal floods, late commands under load).

Properties asserted, none of them timing-dependent: zero simulator constraint violations,
every published command finite and inside |u| <= u_max, the diagnostic, the SUMMARY
counter, exit code 0. Each class shares one graph (node processes in their own namespace)
across its tests; the last test of a class stops the node and checks the counters the
class's attacks must have left in its SUMMARY line.
"""
from __future__ import annotations

import math
import signal
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from lifecycle_msgs.msg import Transition  # noqa: E402

from attack_helpers import (  # noqa: E402
    DT,
    SMALL_SCPO,
    Flooder,
    answer,
    answering,
    assert_commands_bounded,
    assert_late_commands_harmless,
    assert_unanswered,
    background,
    busy_processes,
    commanding,
    max_gap,
    not_hold,
    probed,
    quiet,
    recoverable_starts,
    start_node,
    status_mentions,
    wait_window,
)
from ros_graph_helpers import STARTUP_TIMEOUT, wait_for  # noqa: E402
from scpo_ros.graph import SIMULATOR  # noqa: E402
from scpo_ros.ros.diagnostics import ERROR, WARN  # noqa: E402

NODE = "scpo_safety_node"
SIM = SIMULATOR
GAP = 8 * DT          # "a command in every control period", generously: no gap over 8 periods at the probe
                      # (the probe shares 2 loaded cores with every node process)


def _registered(cls_state: dict, key: str, n: int = 1):
    cls_state[key] = cls_state.get(key, 0) + n


# =============================================================================================
# The node alone, driven by the probe: states, joints, stamps, parameters
# =============================================================================================

class TestProbeDrivenInputs:
    NS = "atk_lone"
    expected: dict = {}

    @pytest.fixture(scope="class")
    def lone(self, tmp_path_factory):
        log_dir = tmp_path_factory.mktemp("atk_lone")
        # the probe's states follow no dynamics: the model monitor would (rightly) trip on them
        procs = {NODE: start_node(log_dir, NODE, self.NS, {**SMALL_SCPO, "state_timeout": 0.25,
                                                           "monitor_enabled": False})}
        with probed(self.NS, "atk_probe_lone", procs, answering("the safety node's state subscription")) as ap:
            yield ap

    # ---- finding 1: unbounded commands
    @pytest.mark.parametrize("p,v", [(50.0, 0.0), (0.0, -30.0), (1e300, 0.0), (-1e300, 1e300), (0.5, 1e10),
                                     (-2.0, 2.0), (1.0000001, 1.0000001)])
    def test_states_far_outside_give_bounded_finite_commands(self, lone, p, v):
        since = time.monotonic()
        t, u, label = answer(lone, p, v)
        assert_commands_bounded(lone.commands(since))
        # outside the certified region the certified policy is not trusted
        assert label != "policy", f"policy trusted at p={p}, v={v}"
        assert lone.procs[NODE].alive()

    @pytest.mark.parametrize("p,v", [(math.nan, 0.0), (0.0, math.nan), (math.inf, 0.0), (0.2, -math.inf),
                                     (math.nan, math.inf), ([0.1], [])])
    def test_nan_inf_and_incomplete_states_get_no_command(self, lone, p, v):
        answer(lone, 0.1, 0.05)
        since = quiet(lone)
        lone.send_state(p, v)
        wait_window(1.0)
        cmds = lone.commands(since)
        assert_commands_bounded(cmds)
        assert not not_hold(cmds), f"a command answered a non-finite/incomplete state: {cmds}"
        assert lone.procs[NODE].alive()
        _registered(self.expected, "bad_states")

    # ---- finding 4: state input by name
    def test_joints_matched_by_name_not_position(self, lone):
        # a positional reader would take wheel's values (0.6, 0.15): a different command
        u_canonical = answer(lone, 0.1, 0.05)[1]
        u_positional = answer(lone, 0.6, 0.15)[1]
        assert not np.allclose(u_canonical, u_positional, atol=1e-3)
        u_swapped = answer(lone, [0.6, 0.1], [0.15, 0.05], names=["wheel", "axis_0"])[1]
        np.testing.assert_allclose(u_swapped, u_canonical, atol=1e-9,
                                   err_msg="joint_states read by position, not by joint name")
        # extra joints after axis_0 do not matter either
        u_extra = answer(lone, [0.1, 7.0, -3.0], [0.05, 9.0, 1.0], names=["axis_0", "gripper", "wheel"])[1]
        np.testing.assert_allclose(u_extra, u_canonical, atol=1e-9)

    @pytest.mark.parametrize("names", [["wheel"], ["axis_1"], [], ["AXIS_0"]])
    def test_message_missing_the_joint_is_rejected(self, lone, names):
        u_bad = answer(lone, 0.6, 0.15)[1]              # positive control: what these values would get
        answer(lone, 0.1, 0.05)
        since = time.monotonic()
        assert_unanswered(lone, lambda: lone.send_state(0.6, 0.15, names=names), u_bad,
                           what=f"joint names {names}")
        _registered(self.expected, "missing_joint")
        wait_for(lambda: [s for s in lone.statuses(NODE, "inputs", since) if s.level >= WARN
                          and status_mentions(s, "missing_joint", "missing joint")], 10.0,
                 "a WARN on the inputs task naming the missing joint")

    # ---- finding 4: stamps
    @pytest.mark.parametrize("offset,reason", [(-5.0, "stale_stamp"), (-0.8, "stale_stamp"),
                                               (5.0, "future_stamp"), (0.5, "future_stamp")])
    def test_old_and_future_stamps_are_rejected(self, lone, offset, reason):
        u_bad = answer(lone, 0.6, 0.15)[1]
        answer(lone, 0.1, 0.05)
        since = time.monotonic()
        assert_unanswered(lone, lambda: lone.send_state(0.6, 0.15, offset=offset), u_bad,
                           what=f"stamp now{offset:+g} s")
        _registered(self.expected, reason)
        # the inputs task may be WARN already (earlier attacks): wait for a status that names the reason
        wait_for(lambda: [s for s in lone.statuses(NODE, "inputs", since) if s.level >= WARN
                          and status_mentions(s, reason)], 10.0, f"a WARN on the inputs task naming {reason}")

    def test_equal_earlier_and_replayed_stamps_are_rejected(self, lone):
        u_bad = answer(lone, 0.6, 0.15)[1]
        answer(lone, 0.1, 0.05)
        stamp = lone.now()

        def same_stamp():
            lone.send_state(0.1, 0.05, stamp=stamp)      # accepted
            lone.send_state(0.6, 0.15, stamp=stamp)      # the same stamp again: non-increasing
        assert_unanswered(lone, same_stamp, u_bad, what="equal stamp")
        def earlier_stamp():
            lone.send_state(0.1, 0.05)                   # accepted, stamped now
            lone.send_state(0.6, 0.15, offset=-0.1)      # fresh enough, but before the one accepted
        assert_unanswered(lone, earlier_stamp, u_bad, what="earlier stamp")
        _registered(self.expected, "non_increasing_stamp", 2)
        # a recorded message played back later (a bag loop, a replay attack)
        recorded = lone.joint_state(0.6, 0.15)
        lone.state_pub.publish(recorded)
        wait_for(lambda: any(np.allclose(u, u_bad) for _, u, lab in lone.commands(time.monotonic() - 1.0)
                             if lab != "hold"), 10.0, "the recorded message answered once")
        answer(lone, 0.1, 0.05)
        assert_unanswered(lone, lambda: lone.state_pub.publish(recorded), u_bad, what="replayed message")
        assert lone.procs[NODE].alive()

    def test_replayed_state_does_not_feed_the_stale_state_watchdog(self, lone):
        answer(lone, 0.1, 0.05)
        last = lone.joint_state(0.1, 0.05)
        lone.state_pub.publish(last)
        since = time.monotonic()
        # no fresh state from here on: only the last one, replayed at the plant's rate
        with background(lambda: lone.state_pub.publish(last), DT):
            mode = wait_for(lambda: [m for m in lone.modes(since) if m["mode"] == "hold_stale"], 10.0,
                            "hold_stale although only replays arrive")
            err = wait_for(lambda: [s for s in lone.statuses(NODE, "control", since) if s.level == ERROR], 10.0,
                           "ERROR on the control task")
        assert mode and err
        assert_commands_bounded(lone.commands(since))
        answer(lone, 0.1, 0.05)                         # fresh states resume control

    # ---- finding 8: parameters that change what the certificate covers
    def test_region_margin_is_gone(self, lone):
        res = lone.set_params(NODE, {"region_margin": 0.5})[0]
        assert not res.successful, "region_margin still widens the trusted region at runtime"
        res = lone.set_params(NODE, {"late_commands": 0})[0]
        assert not res.successful, "late_commands must be read-only"

    def test_limit_tightening_recertifies_before_trusting_the_policy(self, lone):
        """The certificate's plant changes at runtime only by tightening (``u_max_tight``,
        ``x_max_tight``): the tighter limits bind every command at once, the policy waits for its
        re-certification, and releasing them (``[]``: the file's) re-certifies again. A
        loosening, a NaN or a wrong length is refused."""
        # u_max 0.5: the backup cannot keep the certified region; x_max 0.5: the region left outside
        for bad in ({"u_max_tight": [1.5]}, {"u_max_tight": [float("nan")]}, {"x_max_tight": [0.9]},
                    {"u_max_tight": [0.5]}, {"x_max_tight": [0.5, 1.0]}):
            res = lone.set_params(NODE, bad)[0]
            assert not res.successful and res.reason, bad
        t_stream = time.monotonic()
        with background(lambda: lone.send_state(0.3, 0.1), DT):
            wait_for(lambda: len(not_hold(lone.commands(t_stream))) >= 8, 20.0, "commands")
            since = time.monotonic()
            res = lone.set_params(NODE, {"u_max_tight": [0.6], "x_max_tight": [0.9, float("inf")]})
            assert all(r.successful for r in res), [r.reason for r in res]
            t_set = time.monotonic()
            rec = wait_for(lambda: [d for d in lone.decisions(since) if d.get("kind") == "recertify"], 90.0,
                           "re-certification after the tightening")
            t_rec = time.monotonic()
            assert any(m["mode"] == "backup_recertifying" for m in lone.modes(since))
            # nothing trusted the policy on the new limits before its re-certification was published
            early = [(round(t - since, 3), lab) for t, _, lab in lone.commands(since)
                     if lab == "policy" and t < t_rec - 0.2]
            assert not early, f"policy commands before the re-certification: {early}"
            # the tighter actuator limit binds every command sent after the change was accepted
            assert_commands_bounded([c for c in lone.commands(t_set + 0.1)], u_max=0.6)
            if rec[0]["status"] == "accepted":
                wait_for(lambda: any(lab == "policy" for _, _, lab in lone.commands(t_rec)), 30.0,
                         "the policy on the re-certified limits")
            # released: the file's limits again, after one more re-certification
            since = time.monotonic()
            res = lone.set_params(NODE, {"u_max_tight": [], "x_max_tight": []})
            assert all(r.successful for r in res), [r.reason for r in res]
            wait_for(lambda: [d for d in lone.decisions(since) if d.get("kind") == "recertify"], 90.0,
                     "re-certification after the release")
        assert_commands_bounded(lone.commands())

    def test_zz_summary_counts_every_rejection(self, lone):
        code = lone.procs[NODE].stop(timeout=30.0)
        assert code == 0, lone.procs[NODE].text()[-3000:]
        s = lone.procs[NODE].summary()
        assert "rejected_states" in s, f"no rejected_states in SUMMARY: {sorted(s)}"
        rejected = s["rejected_states"]
        for reason in ("missing_joint", "stale_stamp", "future_stamp", "non_increasing_stamp"):
            if reason in self.expected:
                assert rejected.get(reason, 0) >= self.expected[reason], (reason, rejected)
        if "bad_states" in self.expected:
            counted = s.get("bad_states", 0) + sum(v for k, v in rejected.items()
                                                    if k not in ("missing_joint", "stale_stamp", "future_stamp",
                                                                 "non_increasing_stamp"))
            assert counted >= self.expected["bad_states"], (s.get("bad_states"), rejected)


# =============================================================================================
# Simulator + node: starts outside the region, references, lifecycle, floods, shutdown
# =============================================================================================

class TestWithPlant:
    NS = "atk_plant"
    expected: dict = {}

    @pytest.fixture(scope="class")
    def plant(self, tmp_path_factory):
        log_dir = tmp_path_factory.mktemp("atk_plant")
        procs = {NODE: start_node(log_dir, NODE, self.NS, dict(SMALL_SCPO)),
                 SIM: start_node(log_dir, SIM, self.NS, {"cmd_timeout_action": "brake"})}
        with probed(self.NS, "atk_probe_plant", procs, commanding("commands from the safety node")) as ap:
            yield ap

    def _run(self, ap, since, seconds, timeout=60.0):
        """Observe ``seconds`` of plant time (counted in published states)."""
        n = int(round(seconds / DT))
        wait_for(lambda: len(ap.times("joint_states", since)) >= n, timeout, f"{n} plant states")

    # ---- finding 2: starts outside the certified region, inside the recoverable set
    @pytest.mark.parametrize("start", recoverable_starts())
    def test_recoverable_start_outside_the_certified_region(self, plant, start):
        plant.settle()
        since = plant.reset_plant(*start)
        self._run(plant, since, 3.0)
        v = plant.violations(since)
        assert not v, f"started at {start} (recoverable): {len(v)} violations, first {v[0]}"
        assert_commands_bounded(plant.commands(since))

    # ---- finding 3: references
    def test_unbounded_references_are_clamped(self, plant):
        plant.settle()
        since = time.monotonic()
        for r in (-5.0, 1e6, math.nan, -math.inf, 0.51):
            t0 = time.monotonic()
            with background(lambda r=r: plant.send_reference(r), 0.1):
                self._run(plant, t0, 1.5)
        plant.send_reference(0.0)
        v = plant.violations(since)
        assert not v, f"{len(v)} violations under references -5, 1e6, NaN, -inf: first {v[0]}"
        assert_commands_bounded(plant.commands(since))
        wait_for(lambda: [s for s in plant.statuses(NODE, "inputs", since) if s.level == WARN
                          and status_mentions(s, "reference")], 10.0, "a WARN on the inputs task naming the reference")
        # (the SUMMARY check at the end: the count must survive later cleanup/configure cycles)
        _registered(self.expected, "clamped_references")

    def test_reference_chattering_inside_its_limits(self, plant):
        plant.settle()
        since = time.monotonic()
        flip = {"r": 0.5}

        def chatter():
            flip["r"] = -flip["r"]
            plant.send_reference(flip["r"])
        with background(chatter, DT / 2):               # faster than the control period
            self._run(plant, since, 5.0)
        plant.send_reference(0.0)
        v = plant.violations(since)
        assert not v, f"{len(v)} violations under a reference chattering at ±0.5: first {v[0]}"
        assert_commands_bounded(plant.commands(since))

    # ---- finding 6: lifecycle
    def test_deactivate_and_cleanup_keep_the_plant_safe(self, plant):
        plant.settle()
        since = plant.reset_plant(0.0, 0.5)              # moving toward the wall
        wait_for(lambda: plant.commands(since), 20.0, "a command for the moving plant")
        try:
            assert plant.transition(NODE, Transition.TRANSITION_DEACTIVATE)
            t_off = time.monotonic()
            self._run(plant, t_off, 5.0)
            t_end = time.monotonic()
            cmds = plant.commands(t_off + 0.3)
            assert cmds, "deactivated: no commands, the plant is uncontrolled"
            assert max_gap([t for t, _, _ in cmds], t_off + 0.3, t_end) <= GAP
            assert {lab for _, _, lab in cmds} <= {"backup"}, {lab for _, _, lab in cmds}
            assert not plant.violations(since)
            assert plant.transition(NODE, Transition.TRANSITION_CLEANUP)
            t_clean = time.monotonic()
            self._run(plant, t_clean, 3.0)
            cmds = plant.commands(t_clean + 0.3)
            assert cmds, "cleaned up: no commands"
            assert max_gap([t for t, _, _ in cmds], t_clean + 0.3, time.monotonic()) <= GAP
            assert not plant.violations(since)
            _registered(self.expected, "inactive_commands")
        finally:
            plant.ensure_active(NODE)
        t_on = time.monotonic()
        wait_for(lambda: any(lab == "policy" for _, _, lab in plant.commands(t_on)), 90.0,
                 "the policy again after activate")
        assert_commands_bounded(plant.commands(since))
        assert not plant.violations(since)

    # ---- finding 9: proposal flood
    def test_proposal_flood_does_not_degrade_the_control_path(self, plant):
        plant.settle()
        since = time.monotonic()
        flip = {"r": 0.4}

        def move():
            flip["r"] = -flip["r"]
            plant.send_reference(flip["r"])
        flooder = Flooder(plant.topic("proposed_weights"), rate=1000.0, duration=5.0)
        try:
            with background(move, 1.0):                  # the plant moves during the flood
                counts = flooder.result()
        finally:
            flooder.kill()
        plant.send_reference(0.0)
        end = time.monotonic()
        assert counts["sent"] >= 1000 and counts["matched"] >= 1, counts
        # the flood ran over the last counts["seconds"] s before the flooder's exit
        start = end - counts["seconds"]
        cmd_t = [t for t, _, _ in plant.commands(start)]
        states = plant.times("joint_states", start, end)
        assert max_gap(cmd_t, start + GAP, end - GAP) <= GAP, "a control period without a command"
        assert len([t for t in cmd_t if t <= end]) >= 0.8 * len(states), (len(cmd_t), len(states))
        assert not plant.violations(since)
        assert_commands_bounded(plant.commands(since))
        assert plant.procs[NODE].alive()
        records = [d for d in plant.decisions(start) if d.get("kind") == "malformed"]
        assert len(records) < 0.1 * counts["malformed"], \
            f"{len(records)} decision records for {counts['malformed']} malformed proposals: not aggregated"
        _registered(self.expected, "flood", counts["malformed"])

    # ---- finding 6: shutdown (last: it ends the node)
    def test_zz_sigint_keeps_commanding_until_rest(self, plant):
        plant.settle()
        since = plant.reset_plant(0.0, 0.6)
        wait_for(lambda: plant.commands(since), 20.0, "a command for the moving plant")
        node = plant.procs[NODE]
        t_sig = time.monotonic()
        node.proc.send_signal(signal.SIGINT)
        try:
            node.proc.wait(timeout=30.0)
        except Exception:
            pass
        code = node.stop(timeout=10.0)
        t_exit = time.monotonic()
        self._run(plant, t_exit, 1.0)
        assert code == 0, node.text()[-3000:]
        after = plant.commands(t_sig + 0.2)
        assert after, "no command after SIGINT: the moving plant was left to its watchdog"
        assert_commands_bounded(plant.commands(since))
        assert not plant.violations(since)
        s = node.summary()
        assert s.get("shutdown_commands", 0) > 0, f"SUMMARY shutdown_commands: {s.get('shutdown_commands')}"
        if "clamped_references" in self.expected:
            assert s.get("clamped_references", 0) > 0, s.get("clamped_references")
        if "inactive_commands" in self.expected:
            assert s.get("inactive_commands", 0) > 0, s.get("inactive_commands")
        if "flood" in self.expected:
            assert "flood_dropped" in s, sorted(s)
            assert s.get("malformed", 0) + s.get("flood_dropped", 0) > 0
        assert s.get("policy_interventions", 0) == 0, \
            f"the envelope changed {s.get('policy_interventions')} certified-policy commands"


class TestInactiveSilent:
    """``inactive_behavior: silent``: no commands while inactive, the simulator's brake keeps it safe."""
    NS = "atk_silent"

    def test_silent_inactive_node_and_braking_simulator(self, tmp_path):
        procs = {NODE: start_node(tmp_path, NODE, self.NS, {**SMALL_SCPO, "inactive_behavior": "silent"}),
                 SIM: start_node(tmp_path, SIM, self.NS, {"cmd_timeout_action": "brake"})}
        with probed(self.NS, "atk_probe_silent", procs, commanding("commands from the safety node")) as ap:
            ap.settle()
            since = ap.reset_plant(0.0, 0.5)
            wait_for(lambda: ap.commands(since), 20.0, "a command for the moving plant")
            assert ap.transition(NODE, Transition.TRANSITION_DEACTIVATE)
            t_off = time.monotonic()
            wait_for(lambda: len(ap.times("joint_states", t_off)) >= 100, 60.0, "5 s of plant states")
            assert not ap.commands(t_off + 0.3), "inactive_behavior silent, yet commands while inactive"
            v = ap.violations(since)
            assert not v, f"{len(v)} violations: the simulator's cmd_timeout_action brake did not stop it"
            assert ap.transition(NODE, Transition.TRANSITION_ACTIVATE)
            t_on = time.monotonic()
            wait_for(lambda: ap.commands(t_on), 20.0, "commands after activate")
            assert_commands_bounded(ap.commands())
        assert procs[NODE].summary().get("inactive_commands", 0) == 0


class TestSimTime:
    """``use_sim_time: true``: never silently dead; with /clock it controls and its watchdog works."""
    NS = "atk_simtime"

    @pytest.fixture(scope="class")
    def simtime(self, tmp_path_factory):
        log_dir = tmp_path_factory.mktemp("atk_simtime")
        procs = {NODE: start_node(log_dir, NODE, self.NS, {**SMALL_SCPO, "use_sim_time": True,
                                                           "monitor_enabled": False})}
        with probed(self.NS, "atk_probe_simtime", procs) as ap:
            ap.log_dir = log_dir
            wait_for(lambda: ap.statuses(NODE, ""), STARTUP_TIMEOUT, "diagnostics from the safety node")
            yield ap

    def test_without_clock_it_says_so(self, simtime):
        diag = wait_for(lambda: [s for s in simtime.statuses(NODE, "") if s.level in (WARN, ERROR)
                                 and status_mentions(s, "clock")], 30.0,
                        "a WARN/ERROR diagnostic naming the missing /clock")
        assert diag
        assert simtime.procs[NODE].alive()

    def test_with_clock_commands_flow_and_the_watchdog_works(self, simtime):
        sim = start_node(simtime.log_dir, SIM, self.NS, {"publish_clock": True, "use_sim_time": False})
        simtime.procs[SIM] = sim
        since = time.monotonic()
        wait_for(lambda: len(simtime.commands(since)) >= 40, STARTUP_TIMEOUT, "commands on simulated time")
        assert_commands_bounded(simtime.commands(since))
        assert not simtime.violations(since)
        t_stop = time.monotonic()                        # states stop before the process has exited
        assert sim.stop(timeout=30.0) == 0
        # /clock stopped with the simulator: the stale-state watchdog must still fire
        wait_for(lambda: [m for m in simtime.modes(t_stop) if m["mode"] == "hold_stale"], 15.0,
                 "hold_stale after the simulator (and its clock) stopped")
        wait_for(lambda: [s for s in simtime.statuses(NODE, "control", t_stop) if s.level == ERROR], 15.0,
                 "ERROR on the control task")
        assert simtime.procs[NODE].alive()


# =============================================================================================
# Finding 10: late commands and CPU load
# =============================================================================================

@pytest.mark.slow
def test_late_commands_under_load_zero_violations(tmp_path):
    ns = "atk_load"
    procs = {NODE: start_node(tmp_path, NODE, ns, dict(SMALL_SCPO)),
             "learner": start_node(tmp_path, "learner", ns, {}),
             "expert": start_node(tmp_path, "expert", ns, {"malicious": True, "malicious_period_s": 4.0}),
             SIM: start_node(tmp_path, SIM, ns, {"late_command_probability": 0.3, "seed": 3,
                                                 "cmd_timeout_action": "brake"})}
    with probed(ns, "atk_probe_load", procs, commanding("commands from the safety node")) as ap:
        since = time.monotonic()
        with busy_processes(2):
            wait_for(lambda: len(ap.times("joint_states", since)) >= 200, 120.0, "10 s of plant states")
    assert_late_commands_harmless(ap, procs[SIM], since)
