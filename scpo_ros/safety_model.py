"""What the safety nodes' certificates and envelopes are built from, ROS-free.

``build_model(values)`` turns parameter values (``scpo_ros.params`` tables) into the
``Model`` of ``scpo_safety_node``: the plant (``scpo_ros.plant.plant_from_params``, the one
loader seam), the backup, the policy layout and the SCPO settings. It refuses, with the
reason, a model the node could not run safely: a backup that does not certify the region,
limits without a safe set, a backup that leaves that safe set from the region.

``safeguard_envelope(values)`` is the command envelope of ``action_safeguard``, from the same
plant parameters (or the pendulum's, its one variant).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .backup import BackupCertificationError, LQRBackup, PendulumLQR
from .dynamics import Pendulum
from .envelope import CommandEnvelope
from .plant import Plant, plant_from_params
from .policy import MLPLayout
from .residual_scpo import backup_weights
from .rollout import METRICS, DoubleIntegratorRollout, SafetySpec, structured_states
from .safeguard.invariant_set import SafeActionSet, safe_set_for
from .scpo import SCPOConfig


@dataclass(frozen=True)
class Model:
    """Everything the certificate depends on, built from parameter values (picklable: the
    worker process gets it; the safe set is rebuilt there from the same values, cached)."""

    plant: Plant
    backup: LQRBackup
    """``plant.backup()``, built once."""
    layout: MLPLayout
    config: SCPOConfig
    safety: SafetySpec
    n_sample_states: int
    n_cert_states: int
    seed: int
    late_commands: int

    def safe_set(self) -> SafeActionSet:
        """The safe set of the envelope and of the certificate's ``safe_set`` metric."""
        return self.plant.safe_set(self.late_commands)


def build_model(values: Mapping[str, Any]) -> Model:
    """The model of ``values``; ``ValueError`` (``BackupCertificationError`` included) with the
    reason if it is unusable."""
    plant = plant_from_params(values)
    backup = plant.backup()
    backup.certify(plant.region)
    for name in ("margins", "cert_margins"):
        if len(values[name]) not in (1, len(METRICS)):
            raise ValueError(f"{name} needs 1 or {len(METRICS)} entries, got {len(values[name])}")
    config = SCPOConfig(**{f.name: tuple(values[f.name]) if f.name in ("margins", "cert_margins") else values[f.name]
                           for f in fields(SCPOConfig)})
    safety = SafetySpec(horizon=values["horizon"], lyap_alpha=values["lyap_alpha"], lyap_eps=values["lyap_eps"])
    dof = plant.system.dof
    layout = MLPLayout(3 * dof, dof, tuple(int(h) for h in values["hidden"]))
    model = Model(plant, backup, layout, config, safety, int(values["n_sample_states"]),
                  int(values["n_cert_states"]), int(values["seed"]), int(values["late_commands"]))
    check_backup_in_safe_set(model)
    return model


def check_backup_in_safe_set(model: Model) -> None:
    """Refuse a model whose backup leaves ``U_safe`` from the certified region.

    The backup's weights are what the node starts from and falls back to; they must pass the
    ``safe_set`` metric like any certified weights, or the envelope would have to correct
    the "certified" law from the start. Checked on the region's structured states (its
    vertices among them: the worst case of a linear closed loop sits there).
    """
    try:
        safe_set = model.safe_set()
    except (ValueError, RuntimeError) as exc:
        raise BackupCertificationError(f"no safe set for these limits: {exc}") from exc
    system = model.plant.system
    engine = DoubleIntegratorRollout(system, model.backup, model.layout, model.safety,
                                     safe_rows=safe_set.affine_rows())
    x0, r = structured_states(model.plant.region, system.dof, max_points=128)
    g = engine.evaluate(backup_weights(model.layout, model.seed), x0, r).g[0]
    worst = float(g[METRICS.index("safe_set")])
    if not worst < 0.0:
        raise BackupCertificationError(f"the backup leaves the safe set from the certified region "
                                       f"(safe_set metric {worst:.3g} > 0): shrink the region or change the limits")


def safeguard_envelope(values: Mapping[str, Any]) -> CommandEnvelope:
    """The envelope of ``action_safeguard``: the safe set of the plant (``late_commands``) and
    its LQR backup, projected with ``solver`` and ``boundary_margin``.

    ``plant: double_integrator`` is the plant of ``plant_from_params`` (the one every node
    shares); ``plant: pendulum`` reads the same limits as the pendulum's (angle, rate,
    normalised torque; ``dof`` must be 1) and backs up with an LQR on its upright
    linearisation (``r`` ignored)."""
    if values["plant"] == "pendulum":
        if values["dof"] != 1:
            raise ValueError("parameter dof must be 1 for the pendulum")
        system = Pendulum(dt=values["dt"], theta_max=values["p_max"], theta_dot_max=values["v_max"],
                          a_max=values["u_max"])
        backup = PendulumLQR(system, values["q_pos"], values["q_vel"], values["r_act"])
        safe_set = safe_set_for(system, late_commands=values["late_commands"])
    else:
        plant = plant_from_params(values)
        safe_set, backup = plant.safe_set(values["late_commands"]), plant.backup()
    return CommandEnvelope(safe_set, backup, solver=values["solver"], boundary_margin=values["boundary_margin"])
