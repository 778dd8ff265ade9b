"""``expert``: the demonstrator, a tracking controller on a reference schedule (``scpo_ros.expert``).

On every state it publishes, for that state:
- ``expert_action`` (``std_msgs/Float64MultiArray``): the demonstrated action (never sent to the plant),
- ``reference`` (``std_msgs/Float64MultiArray``): the clean reference position per axis (the
  reference the controllers track; it stays clean in malicious phases),
- ``malicious`` (``std_msgs/Bool``): whether this demonstration is a malicious one.

The schedule's clock starts with the first state received (wall time of the node clock),
so it lines up with the simulator however late either process starts. With
``malicious: true`` the last ``malicious_duty`` of every ``malicious_period_s`` demonstrates
actions that drive the plant beyond its limits.

States are read by joint name from the plant file's ``joints:`` map (``inputs.JointMap``); a
state without the needed joints or with a non-finite value is counted and ignored.

Parameters: ``plant_file`` (read once: the expert is the LQR of that plant with its backup
weights scaled by ``gain_q``/``gain_r``, its references fractions of the certified reference
box) and the schedule of the demonstrations (``ExpertConfig``: every field a fraction or a
multiplier).
"""
from __future__ import annotations

import sys

import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, Float64MultiArray

from .. import graph as g
from ..expert import Expert, ExpertConfig, is_malicious
from ..inputs import JointMap
from ..params import PLANT_PARAMS, ParamSpec, compose
from ..plant import Plant, load_plant
from ..ros.diagnostics import OK, WARN, Diagnostics
from ..ros.parameters import add_parameter_validator, declare_parameters
from ..ros.qos import CONTROL_QOS
from ..ros.runner import flush_publishers, run_node

_D = ExpertConfig()
EXPERT_PARAMS = (
    ParamSpec("references", list(_D.references), "Reference schedule visited in turn, each a fraction of the "
                                                  "certified reference box (-1: -r_max, 0: centre, 1: r_max; axis "
                                                  "i starts i entries later).", -1.0, 1.0, min_len=1, max_len=64),
    ParamSpec("switch_period_s", _D.switch_period_s, "Time each reference is held (s).", 0.05, 3600.0),
    ParamSpec("gain_q", _D.gain_q, "The clean expert's LQR state weights: the backup's (q_pos, q_vel) times "
                                   "this.", 1e-3, 1e3),
    ParamSpec("gain_r", _D.gain_r, "The clean expert's LQR input weights: the backup's r_act times this.",
              1e-3, 1e3),
    ParamSpec("u_limit", _D.u_limit, "Clean actions stay within this fraction of the input box around the "
                                     "reference's equilibrium input.", 1e-3, 1.0),
    ParamSpec("malicious", _D.malicious, "Enable the malicious phases."),
    ParamSpec("malicious_period_s", _D.malicious_period_s, "Length of one clean + malicious cycle (s).",
              0.1, 3600.0),
    ParamSpec("malicious_duty", _D.malicious_duty, "Fraction of each cycle (its end) that is malicious.", 0.0, 1.0),
    ParamSpec("malicious_target", _D.malicious_target, "Malicious target of a tracked state in half-widths of its "
                                                       "limit box from the centre (side follows the clean "
                                                       "reference); above 1 to be unsafe.", 1e-3, 1e3),
    ParamSpec("malicious_gain", _D.malicious_gain, "Gain multiplier in malicious phases (no clipping).", 1e-3, 1e3),
)
PARAMS = compose(PLANT_PARAMS[:1], EXPERT_PARAMS)

CONFIG_FIELDS = ("switch_period_s", "gain_q", "gain_r", "u_limit", "malicious", "malicious_period_s",
                 "malicious_duty", "malicious_target", "malicious_gain")


def expert_config(values: dict) -> ExpertConfig:
    return ExpertConfig(references=tuple(float(r) for r in values["references"]),
                        **{k: values[k] for k in CONFIG_FIELDS})


def make_expert(values: dict, plant: Plant) -> Expert:
    """The demonstrator of ``values`` for ``plant`` (``ValueError`` with the reason for unusable
    values)."""
    return Expert(plant, expert_config(values))


class ExpertNode(Node):
    def __init__(self, **kwargs):
        super().__init__(g.EXPERT, **kwargs)
        self.p = declare_parameters(self, PARAMS)
        self.plant = load_plant(self.p["plant_file"])
        self.joints = JointMap(self.plant.joints)
        self.expert = make_expert(self.p, self.plant)
        self.cfg = self.expert.cfg
        self.x = np.zeros(self.plant.n)
        self.t_start = None
        self.demos = 0
        self.malicious_demos = 0
        self.bad_states = 0
        self.action_pub = self.create_publisher(Float64MultiArray, g.EXPERT_ACTION, CONTROL_QOS)
        self.ref_pub = self.create_publisher(Float64MultiArray, g.REFERENCE, CONTROL_QOS)
        self.mal_pub = self.create_publisher(Bool, g.MALICIOUS, CONTROL_QOS)
        self.create_subscription(JointState, g.JOINT_STATES, self._on_state, CONTROL_QOS)
        self.diag = Diagnostics(self)
        add_parameter_validator(self, PARAMS, check=self._check, apply=self._apply)
        self._update_diagnostics(False)
        self.get_logger().info(f"expert for {self.plant.name}: malicious={self.cfg.malicious}, "
                               f"references={list(self.cfg.references)}")

    def _check(self, values) -> str | None:
        try:
            make_expert(values, self.plant)
        except ValueError as exc:
            return str(exc)
        return None

    def _apply(self, values, changed) -> None:
        self.p = values
        self.expert = make_expert(values, self.plant)
        self.cfg = self.expert.cfg
        self.get_logger().info(f"parameters changed: {sorted(changed)}")

    def _on_state(self, msg: JointState) -> None:
        reason = self.joints.read_msg(msg, self.x)
        if reason is not None:
            self.bad_states += 1
            self.get_logger().error(f"ignored a state ({reason}): need the joints {list(self.joints.joints)} "
                                    f"of {self.plant.name}, finite", throttle_duration_sec=1.0)
            return
        now = self.get_clock().now().nanoseconds * 1e-9
        if self.t_start is None:
            self.t_start = now
        t = now - self.t_start
        r = self.expert.reference_at(t)
        mal = is_malicious(t, self.cfg)
        u = self.expert.action(self.x, r, mal)
        self.action_pub.publish(Float64MultiArray(data=u.tolist()))
        self.ref_pub.publish(Float64MultiArray(data=r.tolist()))
        self.mal_pub.publish(Bool(data=bool(mal)))
        self.demos += 1
        self.malicious_demos += int(mal)
        if self.demos % 20 == 1:
            self._update_diagnostics(mal)

    def _update_diagnostics(self, mal: bool) -> None:
        level = WARN if mal or self.bad_states else OK
        msg = "demonstrating MALICIOUS actions" if mal else "demonstrating"
        self.diag.update("demonstrations", level, msg, demonstrations=self.demos,
                         malicious_demonstrations=self.malicious_demos, bad_states=self.bad_states,
                         malicious_enabled=self.cfg.malicious)

    def summary(self) -> dict:
        return {"node": g.EXPERT, "demonstrations": self.demos, "malicious_demonstrations": self.malicious_demos}

    def destroy_node(self):
        flush_publishers([self.action_pub, self.ref_pub, self.mal_pub])
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(ExpertNode, args)


if __name__ == "__main__":
    sys.exit(main())
