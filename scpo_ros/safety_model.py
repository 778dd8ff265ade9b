"""What the safety nodes' certificates and envelopes are built from, ROS-free.

``build_model(values)`` turns parameter values (``scpo_ros.params`` tables) into the ``Model``
of ``scpo_safety_node``: the plant (``params.plant_of``: the ``plant_file`` with the runtime
``*_tight`` limits), its LQR backup, the policy layout (input ``[x, r]``, output the plant's inputs)
and the SCPO settings. It refuses, with the reason, a model the node could not run safely: a
backup that does not certify the region, limits without a safe set, a backup that leaves that
safe set from the region.

``safeguard_envelope(values)`` is the command envelope of ``action_safeguard``, from the same
plant.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .backup import BackupCertificationError, LQRBackup
from .envelope import CommandEnvelope
from .params import plant_of
from .plant import Plant
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
    """What the safe set absorbs: the ``late_commands`` parameter, or 0 where the plant's set
    is nominal only (a model plant such as the pendulum)."""

    def safe_set(self):
        """The safe set of the envelope and of the certificate's ``safe_set`` metric
        (``safeguard.invariant_set.safe_set_for``; built once per plant, backup and
        ``late_commands`` in this process: an implicit set costs LPs)."""
        return cached_safe_set(self.plant, self.backup, self.late_commands)

    def certificate_set(self):
        """The set the certificate's ``safe_set`` metric keeps: ``safe_set()``, or its nominal
        set where the late-command block was taken on the nominal set (``held block on the
        nominal set``: the Ψ-closure did not settle, e.g. ``coupled_two_input``). There the
        backup itself only keeps the nominal rows, so certifying against the late rows would
        refuse the backup; the envelope still projects every command onto the full set."""
        S = self.safe_set()
        return S.nominal_set() if "held block on the nominal set" in S.name else S


_SAFE_SETS: OrderedDict = OrderedDict()
_SAFE_SET_CACHE_SIZE = 8


def cached_safe_set(plant: Plant, backup: LQRBackup, late_commands: int):
    """The safe set absorbing up to ``late_commands`` (``safe_set_with_late``'s set)."""
    return safe_set_with_late(plant, backup, late_commands)[0]


def safe_set_with_late(plant: Plant, backup: LQRBackup, late_commands: int):
    """``safe_set_at_most(plant, backup, late_commands)``: the set and the late commands it absorbs
    (fewer than asked only for a model plant whose set cannot absorb one), memoised on what it
    depends on: the plant's digest (its description or file), its limits and region (runtime
    tightening keeps the file's text), the backup's gain and ``late_commands``."""
    from .safeguard.invariant_set import safe_set_at_most
    key = (plant.digest, plant.x_min.tobytes(), plant.x_max.tobytes(), plant.u_min.tobytes(),
           plant.u_max.tobytes(), plant.region.lower.tobytes(), plant.region.upper.tobytes(), backup.K.tobytes(),
           int(late_commands))
    if key not in _SAFE_SETS:
        _SAFE_SETS[key] = safe_set_at_most(plant, backup, late_commands=int(late_commands))
        while len(_SAFE_SETS) > _SAFE_SET_CACHE_SIZE:
            _SAFE_SETS.popitem(last=False)
    _SAFE_SETS.move_to_end(key)
    return _SAFE_SETS[key]


def safety_spec(values: Mapping[str, Any], plant: Plant) -> SafetySpec:
    """The rollouts' ``SafetySpec`` of the values (``horizon_s`` in seconds, run in steps of the
    plant's ``dt``)."""
    return SafetySpec(horizon_s=float(values["horizon_s"]), lyap_alpha=float(values["lyap_alpha"]),
                      lyap_eps=float(values["lyap_eps"]))


def build_model(values: Mapping[str, Any], base: Plant | None = None) -> Model:
    """The model of ``values``; ``ValueError`` (``BackupCertificationError`` and ``PlantError``
    included) with the reason if it is unusable. ``base``: the plant file already read (a node
    reads it once; ``plant_file`` is read-only), tightened here by the values' ``*_tight``."""
    plant = plant_of(values, base)
    backup = LQRBackup(plant)
    backup.certify(plant.region)
    for name in ("margins", "cert_margins"):
        if len(values[name]) not in (1, len(METRICS)):
            raise ValueError(f"{name} needs 1 or {len(METRICS)} entries, got {len(values[name])}")
    config = SCPOConfig(**{f.name: tuple(values[f.name]) if f.name in ("margins", "cert_margins") else values[f.name]
                           for f in fields(SCPOConfig)})
    layout = MLPLayout(plant.n + plant.nr, plant.m, tuple(int(h) for h in values["hidden"]))
    try:   # what the plant's safe set absorbs: late_commands, or 0 for a nominal-only model set
        late = safe_set_with_late(plant, backup, int(values["late_commands"]))[1]
    except (ValueError, RuntimeError) as exc:
        raise BackupCertificationError(f"no safe set for these limits: {exc}") from exc
    model = Model(plant, backup, layout, config, safety_spec(values, plant), int(values["n_sample_states"]),
                  int(values["n_cert_states"]), int(values["seed"]), late)
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
        safe_set = model.certificate_set()
    except (ValueError, RuntimeError) as exc:
        raise BackupCertificationError(f"no safe set for these limits: {exc}") from exc
    engine = PlantRollout(model.plant, model.backup, model.layout, model.safety, safe_rows=safe_set)
    x0, r = structured_states(model.plant, max_points=128)
    g = engine.evaluate(backup_weights(model.layout, model.seed), x0, r).g[0]
    if engine.robust:
        # under the declared uncertainty the backup itself must keep every limit and stay in the
        # (robust) safe set: the robust rollouts' state, input and safe_set metrics
        bad = {name: float(v) for name, v in zip(METRICS, g.tolist()) if name != "lyapunov" and v >= 0.0}
        if bad:
            raise BackupCertificationError(
                f"the backup is not robustly safe on the certified region under the declared uncertainty "
                f"({', '.join(f'{k} metric {v:.3g} > 0' for k, v in bad.items())}; the rollouts cover "
                f"{engine.covers}): shrink certified_region, make the backup faster, or declare less uncertainty")
    worst = float(g[METRICS.index("safe_set")])
    if not worst < 0.0:
        raise BackupCertificationError(f"the backup leaves the safe set from the certified region "
                                       f"(safe_set metric {worst:.3g} > 0): shrink the region or change the limits")


def safeguard_envelope(values: Mapping[str, Any], plant: Plant) -> CommandEnvelope:
    """The envelope of ``action_safeguard``: the safe set of ``plant`` (``params.plant_of`` of the
    node's values, ``late_commands``) and its LQR backup, projected with ``solver`` and
    ``boundary_margin``."""
    backup = LQRBackup(plant)
    safe_set = cached_safe_set(plant, backup, values["late_commands"])
    return CommandEnvelope(safe_set, backup, solver=values["solver"], boundary_margin=values["boundary_margin"])
