"""The plant: everything about the robot that is not a runtime tunable, in one dataclass.

``plant_from_params`` is the one place a plant is built from parameter values (the
``PLANT_PARAMS``, ``BACKUP_PARAMS`` and ``REGION_PARAMS`` tables of ``scpo_ros.params``);
every node builds its plant there. It is the loader seam: a plant read from a file
arrives as the same ``Plant``. Nothing here imports rclpy.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .backup import InitialSet, LQRBackup
from .dynamics import DoubleIntegrator
from .params import BACKUP_PARAMS, PLANT_PARAMS, REGION_PARAMS
from .safeguard.invariant_set import SafeActionSet, safe_set_for


@dataclass(frozen=True)
class Plant:
    """The model (``system``: dynamics and limits), the backup's LQR weights and the
    certified region of states and references."""

    system: DoubleIntegrator
    backup_weights: tuple[float, float, float]
    """``(q_pos, q_vel, r_act)``."""
    region: InitialSet

    def backup(self) -> LQRBackup:
        q_pos, q_vel, r_act = self.backup_weights
        return LQRBackup(self.system, q_pos=q_pos, q_vel=q_vel, r_act=r_act)

    def safe_set(self, late_commands: int = 1) -> SafeActionSet:
        """The safe action set of the envelope (and of the certificate's ``safe_set`` metric)."""
        return safe_set_for(self.system, late_commands=late_commands)


_TABLES = (PLANT_PARAMS, BACKUP_PARAMS, REGION_PARAMS)


def plant_from_params(values: Mapping[str, Any]) -> Plant:
    """The plant of the parameter values ``values`` (a node's declared parameters).

    The plant's limits (``PLANT_PARAMS``) are required. A node that never uses the backup
    or the region (the simulator) need not declare them: absent ones take their table
    defaults. Raises ``ValueError`` naming the parameter: a value out of its range, a
    missing limit, a region outside the limits, or weights without an LQR solution.
    """
    v: dict[str, Any] = {}
    for table in _TABLES:
        for spec in table:
            if spec.name in values:
                value = values[spec.name]
            elif table is PLANT_PARAMS:
                raise ValueError(f"parameter {spec.name} is missing")
            else:
                value = spec.default
            reason = spec.check(value)
            if reason:
                raise ValueError(f"parameter {reason}")
            v[spec.name] = value
    system = DoubleIntegrator(dof=v["dof"], dt=float(v["dt"]), p_max=float(v["p_max"]),
                              v_max=float(v["v_max"]), u_max=float(v["u_max"]))
    region = InitialSet(p0_max=float(v["p0_max"]), v0_max=float(v["v0_max"]), r_max=float(v["r_max"]))
    for name, limit in (("p0_max", "p_max"), ("v0_max", "v_max"), ("r_max", "p_max")):
        if name in values and v[name] > v[limit]:
            raise ValueError(f"parameter {name} = {v[name]} is outside the limits: above {limit} = {v[limit]}")
    plant = Plant(system, (float(v["q_pos"]), float(v["q_vel"]), float(v["r_act"])), region)
    try:
        plant.backup()
    except (ValueError, ArithmeticError) as exc:   # numpy's LinAlgError is a ValueError
        raise ValueError(f"parameters q_pos, q_vel, r_act = {plant.backup_weights} give no LQR backup: {exc}") from exc
    return plant
