"""Issue 9, written as an attacker would: action_safeguard over real DDS (simulator +
safeguard + a raw-action policy in the probe, or the safeguard alone driven by the probe).

Attacks: raw actions that stop (finding 5), unbounded/NaN states and raw actions,
unbounded references, joints out of order, old/future stamps, deactivation while moving,
late commands under CPU load. Properties: zero simulator violations, every command finite
and inside |u| <= u_max, a command for every state, the SUMMARY counters, exit code 0.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from lifecycle_msgs.msg import Transition  # noqa: E402

from attack_helpers import (  # noqa: E402
    DT,
    PARAMS,
    SAFEGUARD_PARAMS,
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
    start_node,
    status_mentions,
    wait_window,
)
from ros_graph_helpers import STARTUP_TIMEOUT, wait_for  # noqa: E402
from scpo_ros.graph import SIMULATOR, compare_params_file  # noqa: E402
from scpo_ros.ros.diagnostics import WARN  # noqa: E402

NODE = "action_safeguard"
SIM = SIMULATOR
# measured at the probe, generously: the probe shares 2 loaded cores with every node process
SILENT_GAP = 6 * DT
GAP = 8 * DT


def _params_file(log_dir):
    """The compare demo's file: the plant's YAML, the safeguard's section, the simulator's
    plant copied into it (the safeguard guards the plant it was built for)."""
    return compare_params_file(PARAMS, SAFEGUARD_PARAMS, {}, log_dir / "attack_params.yaml")


def _start(log_dir, name, ns, params):
    return start_node(log_dir, name, ns, params, _params_file(log_dir))


def _run(ap, since, seconds, timeout=60.0):
    n = int(round(seconds / DT))
    wait_for(lambda: len(ap.times("joint_states", since)) >= n, timeout, f"{n} plant states")


def _push(u):
    return lambda _msg: [u]


# =============================================================================================
# Simulator + safeguard + a raw-action policy in the probe
# =============================================================================================

class TestSafeguardWithPlant:
    NS = "atk_sg"
    expected: dict = {}

    @pytest.fixture(scope="class")
    def sg(self, tmp_path_factory):
        log_dir = tmp_path_factory.mktemp("atk_sg")
        procs = {NODE: _start(log_dir, NODE, self.NS, {}),
                 SIM: _start(log_dir, SIM, self.NS, {"cmd_timeout_action": "brake"})}
        with probed(self.NS, "atk_probe_sg", procs, commanding("commands from the safeguard")) as ap:
            yield ap

    # ---- finding 5: raw actions stop
    def test_silent_policy_after_driving_at_the_wall(self, sg):
        sg.settle()
        since = time.monotonic()
        sg.set_policy(_push(3.0))                        # full speed at the wall
        _run(sg, since, 2.5)
        sg.set_policy(None)                              # ... then silence
        t_silent = time.monotonic()
        _run(sg, t_silent, 3.0)
        end = time.monotonic()
        cmd_t = [t for t, _, _ in sg.commands(t_silent)]
        gap = max_gap(cmd_t, t_silent, end)
        assert gap <= SILENT_GAP, f"raw actions stopped: {gap:.3f} s without a command"
        v = sg.violations(since)
        assert not v, f"{len(v)} violations after the raw actions stopped: first {v[0]}"
        assert_commands_bounded(sg.commands(since))
        self.expected["no_action_fallbacks"] = True

    # ---- finding 1 (safeguard side): unbounded and malformed raw actions
    @pytest.mark.parametrize("raw", [[1e300], [-math.inf], [math.nan], [0.5, 0.5], [], [1e6]])
    def test_unbounded_and_malformed_raw_actions(self, sg, raw):
        sg.settle()
        since = time.monotonic()
        sg.set_policy(_push(3.0))
        _run(sg, since, 1.0)
        t_bad = time.monotonic()
        sg.set_policy(lambda _msg: raw)
        _run(sg, t_bad, 2.0)
        end = time.monotonic()
        sg.set_policy(None)
        assert max_gap([t for t, _, _ in sg.commands(t_bad)], t_bad + GAP, end) <= GAP
        assert not sg.violations(since)
        assert_commands_bounded(sg.commands(since))
        assert sg.procs[NODE].alive()

    # ---- finding 3 (safeguard side): references
    def test_unbounded_references_are_clamped(self, sg):
        sg.settle()
        since = time.monotonic()
        sg.set_policy(_push(-3.0))
        for r in (-5.0, math.nan, 1e6, -math.inf):
            t0 = time.monotonic()
            with background(lambda r=r: sg.send_reference(r), 0.1):
                _run(sg, t0, 1.0)
            # raw actions stop for a while: the fallback (which tracks the reference) acts
            sg.set_policy(None)
            t1 = time.monotonic()
            with background(lambda r=r: sg.send_reference(r), 0.1):
                _run(sg, t1, 1.0)
            sg.set_policy(_push(-3.0))
        sg.set_policy(None)
        sg.send_reference(0.0)
        v = sg.violations(since)
        assert not v, f"{len(v)} violations under references -5, NaN, 1e6, -inf: first {v[0]}"
        assert_commands_bounded(sg.commands(since))
        diag = wait_for(lambda: [s for s in sg.statuses(NODE, "", since) if s.level >= WARN
                                 and status_mentions(s, "reference")], 10.0, "a WARN naming the reference")
        assert diag
        self.expected["clamped_references"] = True

    # ---- finding 6 (safeguard side): deactivate while moving
    def test_deactivate_while_moving_keeps_fallback_commands(self, sg):
        sg.settle()
        since = time.monotonic()
        sg.set_policy(_push(3.0))
        _run(sg, since, 1.0)
        try:
            assert sg.transition(NODE, Transition.TRANSITION_DEACTIVATE)
            t_off = time.monotonic()
            _run(sg, t_off, 4.0)
            end = time.monotonic()
            cmds = sg.commands(t_off + 0.3)
            assert cmds, "deactivated: no commands, the plant is uncontrolled"
            assert max_gap([t for t, _, _ in cmds], t_off + 0.3, end) <= GAP
            assert {lab for _, _, lab in cmds} <= {"backup"}, {lab for _, _, lab in cmds}
            v = sg.violations(since)
            assert not v, f"{len(v)} violations after deactivate: first {v[0]}"
            self.expected["inactive_commands"] = True
        finally:
            sg.set_policy(None)
            sg.ensure_active(NODE)
        t_on = time.monotonic()
        sg.set_policy(_push(0.0))
        wait_for(lambda: any(lab == "safeguard" for _, _, lab in sg.commands(t_on)), 20.0,
                 "projections again after activate")
        sg.set_policy(None)
        assert_commands_bounded(sg.commands(since))

    def test_zz_summary(self, sg):
        node = sg.procs[NODE]
        assert node.stop(timeout=30.0) == 0, node.text()[-3000:]
        s = node.summary()
        if self.expected.get("no_action_fallbacks"):
            assert s.get("no_action_fallbacks", 0) > 0, f"no_action_fallbacks: {s.get('no_action_fallbacks')}"
        if self.expected.get("clamped_references"):
            assert s.get("clamped_references", 0) > 0, f"clamped_references: {s.get('clamped_references')}"
        if self.expected.get("inactive_commands"):
            assert s.get("inactive_commands", 0) > 0, f"inactive_commands: {s.get('inactive_commands')}"


# =============================================================================================
# The safeguard alone, driven by the probe: states, joints, stamps
# =============================================================================================

class TestSafeguardInputs:
    """No raw action ever comes: every accepted state is answered with the fallback for it,
    a rejected state with nothing (in particular not with the command its values would get)."""
    NS = "atk_sgl"
    expected: dict = {}

    @pytest.fixture(scope="class")
    def sgl(self, tmp_path_factory):
        log_dir = tmp_path_factory.mktemp("atk_sgl")
        procs = {NODE: _start(log_dir, NODE, self.NS, {})}
        with probed(self.NS, "atk_probe_sgl", procs, answering("the safeguard's state subscription")) as ap:
            yield ap

    @pytest.mark.parametrize("p,v", [(50.0, 0.0), (0.0, -30.0), (1e300, 0.0), (-1e300, 1e300), (0.5, 1e10)])
    def test_states_far_outside_give_bounded_finite_commands(self, sgl, p, v):
        since = time.monotonic()
        answer(sgl, p, v)
        assert_commands_bounded(sgl.commands(since))
        assert sgl.procs[NODE].alive()

    @pytest.mark.parametrize("p,v", [(math.nan, 0.0), (0.0, math.inf), (math.inf, math.nan), ([0.1], [])])
    def test_nan_inf_and_incomplete_states_get_no_command(self, sgl, p, v):
        u_prev = answer(sgl, 0.1, 0.05)[1]
        since = quiet(sgl)
        sgl.send_state(p, v)
        wait_window(1.0)
        cmds = sgl.commands(since)
        assert_commands_bounded(cmds)
        others = [(u.tolist(), lab) for _, u, lab in not_hold(cmds) if not np.allclose(u, u_prev, atol=1e-6)]
        assert not others, f"a command answered a non-finite/incomplete state: {others}"
        self.expected["bad_states"] = self.expected.get("bad_states", 0) + 1

    def test_bad_raw_actions_on_fresh_states(self, sgl):
        since = time.monotonic()
        bad = iter([[math.nan], [math.inf], [1e300], [-1e300], [0.1, 0.2], [], [1e6]] * 3)

        def tick():
            sgl.send_state(0.9, 0.5)                     # near the wall, moving at it
            u = next(bad, None)
            if u is not None:
                sgl.send_raw(u)
        with background(tick, DT):
            wait_for(lambda: len(sgl.commands(since)) >= 30, 30.0, "commands for the bad raw actions")
        assert_commands_bounded(sgl.commands(since))
        assert sgl.procs[NODE].alive()

    def test_joints_matched_by_name_not_position(self, sgl):
        u_canonical = answer(sgl, 0.1, 0.05)[1]
        u_positional = answer(sgl, 0.6, 0.15)[1]
        assert not np.allclose(u_canonical, u_positional, atol=1e-3)
        u_swapped = answer(sgl, [0.6, 0.1], [0.15, 0.05], names=["wheel", "axis_0"])[1]
        np.testing.assert_allclose(u_swapped, u_canonical, atol=1e-9,
                                   err_msg="joint_states read by position, not by joint name")

    @pytest.mark.parametrize("names", [["wheel"], []])
    def test_message_missing_the_joint_is_rejected(self, sgl, names):
        u_bad = answer(sgl, 0.6, 0.15)[1]
        answer(sgl, 0.1, 0.05)
        assert_unanswered(sgl, lambda: sgl.send_state(0.6, 0.15, names=names), u_bad, what=f"names {names}")
        self.expected["missing_joint"] = self.expected.get("missing_joint", 0) + 1

    @pytest.mark.parametrize("offset,reason", [(-5.0, "stale_stamp"), (5.0, "future_stamp")])
    def test_old_and_future_stamps_are_rejected(self, sgl, offset, reason):
        u_bad = answer(sgl, 0.6, 0.15)[1]
        answer(sgl, 0.1, 0.05)
        assert_unanswered(sgl, lambda: sgl.send_state(0.6, 0.15, offset=offset), u_bad,
                           what=f"stamp now{offset:+g} s")
        self.expected[reason] = self.expected.get(reason, 0) + 1

    def test_replayed_message_is_rejected(self, sgl):
        u_bad = answer(sgl, 0.6, 0.15)[1]
        recorded = sgl.joint_state(0.6, 0.15)
        answer(sgl, 0.1, 0.05)
        assert_unanswered(sgl, lambda: sgl.state_pub.publish(recorded), u_bad, what="replayed message")

    def test_zz_summary_counts_every_rejection(self, sgl):
        node = sgl.procs[NODE]
        assert node.stop(timeout=30.0) == 0, node.text()[-3000:]
        s = node.summary()
        assert "rejected_states" in s, f"no rejected_states in SUMMARY: {sorted(s)}"
        rejected = s["rejected_states"]
        for reason in ("missing_joint", "stale_stamp", "future_stamp"):
            if reason in self.expected:
                assert rejected.get(reason, 0) >= self.expected[reason], (reason, rejected)
        if "bad_states" in self.expected:
            counted = s.get("bad_state", 0) + s.get("bad_states", 0) + sum(
                v for k, v in rejected.items() if k not in ("missing_joint", "stale_stamp", "future_stamp",
                                                            "non_increasing_stamp"))
            assert counted >= self.expected["bad_states"], s


# =============================================================================================
# Finding 10 (safeguard side): late commands and CPU load
# =============================================================================================

@pytest.mark.slow
def test_late_commands_under_load_raw_policy_into_the_walls(tmp_path):
    ns = "atk_sg_load"
    procs = {NODE: _start(tmp_path, NODE, ns, {}),
             SIM: _start(tmp_path, SIM, ns, {"late_command_probability": 0.3, "seed": 5,
                                            "cmd_timeout_action": "brake"})}
    with probed(ns, "atk_probe_sg_load", procs) as ap:
        t0 = time.monotonic()
        # into one wall, then the other, every 2 s
        ap.set_policy(lambda _msg: [3.0 if int((time.monotonic() - t0) / 2.0) % 2 == 0 else -3.0])
        wait_for(lambda: len(ap.commands()) >= 10, STARTUP_TIMEOUT, "commands from the safeguard")
        since = time.monotonic()
        with busy_processes(2):
            _run(ap, since, 10.0, timeout=120.0)
    assert_late_commands_harmless(ap, procs[SIM], since)
