"""What the safety nodes' certificates and envelopes are built from, ROS-free.

``build_model(values)`` turns parameter values (``scpo_ros.params`` tables) into the ``Model``
of ``scpo_safety_node``: the generic plant (``plant_of``: a ``plant_file`` when the values name
one, else the double integrator of the old parameters through ``plant.plant_from_params``, the
one bridge), its LQR backup, the policy layout (input ``[x, r]``, output the plant's inputs)
and the SCPO settings. It refuses, with the reason, a model the node could not run safely: a
backup that does not certify the region, limits without a safe set, a backup that leaves that
safe set from the region.

``safeguard_envelope(values)`` is the command envelope of ``action_safeguard``, from the same
plant (or the pendulum's, its one variant of the parameter era: ``plant: pendulum``).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import yaml

from .backup import BackupCertificationError, LQRBackup
from .envelope import CommandEnvelope
from .plant import Plant, load_plant, plant_from_dict, plant_from_params
from .policy import MLPLayout
from .residual_scpo import backup_weights
from .rollout import METRICS, PlantRollout, SafetySpec, structured_states
from .scpo import SCPOConfig


@dataclass(frozen=True)
class Model:
    """Everything the certificate depends on, built from parameter values (picklable: the
    worker process gets it; the safe set is rebuilt there from the same plant, cached)."""

    plant: Plant
    backup: LQRBackup
    """``LQRBackup(plant)``, built once."""
    layout: MLPLayout
    config: SCPOConfig
    safety: SafetySpec
    n_sample_states: int
    n_cert_states: int
    seed: int
    late_commands: int

    def safe_set(self):
        """The safe set of the envelope and of the certificate's ``safe_set`` metric
        (``safeguard.invariant_set.safe_set_for``; built once per plant, backup and
        ``late_commands`` in this process: an implicit set costs LPs)."""
        return cached_safe_set(self.plant, self.backup, self.late_commands)


_SAFE_SETS: OrderedDict = OrderedDict()
_SAFE_SET_CACHE_SIZE = 8


def cached_safe_set(plant: Plant, backup: LQRBackup, late_commands: int):
    """``safe_set_for(plant, backup, late_commands)``, memoised on what it depends on: the plant's
    digest (its description or file), its limits and region (runtime tightening keeps the
    file's text), the backup's gain and ``late_commands``."""
    from .safeguard.invariant_set import safe_set_for
    key = (plant.digest, plant.x_min.tobytes(), plant.x_max.tobytes(), plant.u_min.tobytes(),
           plant.u_max.tobytes(), plant.region.lower.tobytes(), plant.region.upper.tobytes(), backup.K.tobytes(),
           int(late_commands))
    if key not in _SAFE_SETS:
        _SAFE_SETS[key] = safe_set_for(plant, backup, late_commands=int(late_commands))
        while len(_SAFE_SETS) > _SAFE_SET_CACHE_SIZE:
            _SAFE_SETS.popitem(last=False)
    _SAFE_SETS.move_to_end(key)
    return _SAFE_SETS[key]


def plant_of(values: Mapping[str, Any]) -> Plant:
    """The plant of parameter values: ``load_plant(values["plant_file"])`` when it is given and
    non-empty, else the double integrator of the old parameters (``plant_from_params``)."""
    source = values.get("plant_file") or ""
    if source:
        return load_plant(source)
    return plant_from_params(values)


def safety_spec(values: Mapping[str, Any], plant: Plant) -> SafetySpec:
    """The rollouts' ``SafetySpec`` of the values: ``horizon_s`` in seconds (a table that still
    holds ``horizon`` in steps is read as ``horizon × dt``)."""
    horizon_s = values["horizon_s"] if "horizon_s" in values else float(values["horizon"]) * plant.dt
    return SafetySpec(horizon_s=float(horizon_s), lyap_alpha=float(values["lyap_alpha"]),
                      lyap_eps=float(values["lyap_eps"]))


def build_model(values: Mapping[str, Any]) -> Model:
    """The model of ``values``; ``ValueError`` (``BackupCertificationError`` and ``PlantError``
    included) with the reason if it is unusable."""
    plant = plant_of(values)
    backup = LQRBackup(plant)
    backup.certify(plant.region)
    for name in ("margins", "cert_margins"):
        if len(values[name]) not in (1, len(METRICS)):
            raise ValueError(f"{name} needs 1 or {len(METRICS)} entries, got {len(values[name])}")
    config = SCPOConfig(**{f.name: tuple(values[f.name]) if f.name in ("margins", "cert_margins") else values[f.name]
                           for f in fields(SCPOConfig)})
    layout = MLPLayout(plant.n + plant.nr, plant.m, tuple(int(h) for h in values["hidden"]))
    model = Model(plant, backup, layout, config, safety_spec(values, plant), int(values["n_sample_states"]),
                  int(values["n_cert_states"]), int(values["seed"]), int(values["late_commands"]))
    check_backup_in_safe_set(model)
    return model


def check_backup_in_safe_set(model: Model) -> None:
    """Refuse a model whose backup leaves ``U_safe`` from the certified region.

    The backup's weights are what the node starts from and falls back to; they must pass the
    ``safe_set`` metric like any certified weights, or the envelope would have to correct the
    "certified" law from the start. Checked on the region's structured states (its corners
    among them: the worst case of a linear closed loop sits there).
    """
    try:
        safe_set = model.safe_set()
    except (ValueError, RuntimeError) as exc:
        raise BackupCertificationError(f"no safe set for these limits: {exc}") from exc
    engine = PlantRollout(model.plant, model.backup, model.layout, model.safety, safe_rows=safe_set)
    x0, r = structured_states(model.plant, max_points=128)
    g = engine.evaluate(backup_weights(model.layout, model.seed), x0, r).g[0]
    worst = float(g[METRICS.index("safe_set")])
    if not worst < 0.0:
        raise BackupCertificationError(f"the backup leaves the safe set from the certified region "
                                       f"(safe_set metric {worst:.3g} > 0): shrink the region or change the limits")


def pendulum_plant(values: Mapping[str, Any]) -> Plant:
    """The shipped pendulum file with the parameter era's limits and weights: angle ``p_max``,
    rate ``v_max``, normalised torque ``u_max`` (symmetric), backup ``Q = [q_pos, q_vel]``,
    ``R = [r_act]``, ``dt``; its certified region clipped into those limits."""
    if values["dof"] != 1:
        raise ValueError("parameter dof must be 1 for the pendulum")
    d = yaml.safe_load(load_plant("pendulum").text)
    lim = [float(values["p_max"]), float(values["v_max"])]
    reg = d["certified_region"]
    d.update(dt=float(values["dt"]), x_min=[-v for v in lim], x_max=lim, u_min=[-float(values["u_max"])],
             u_max=[float(values["u_max"])],
             backup={"Q": [float(values["q_pos"]), float(values["q_vel"])], "R": [float(values["r_act"])]},
             certified_region={"x_min": [max(a, -b) for a, b in zip(reg["x_min"], lim)],
                               "x_max": [min(a, b) for a, b in zip(reg["x_max"], lim)]})
    return plant_from_dict(d, "<pendulum parameters>")


def safeguard_envelope(values: Mapping[str, Any]) -> CommandEnvelope:
    """The envelope of ``action_safeguard``: the safe set of the plant (``late_commands``) and
    its LQR backup, projected with ``solver`` and ``boundary_margin``.

    The plant is ``plant_of(values)`` (the one every node shares); ``plant: pendulum`` is the
    pendulum of ``pendulum_plant`` (``dof`` must be 1; its backup regulates, ``r`` is empty)."""
    plant = pendulum_plant(values) if values.get("plant") == "pendulum" else plant_of(values)
    backup = LQRBackup(plant)
    safe_set = cached_safe_set(plant, backup, values["late_commands"])
    return CommandEnvelope(safe_set, backup, solver=values["solver"], boundary_margin=values["boundary_margin"])
