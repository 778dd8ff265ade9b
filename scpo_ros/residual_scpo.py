"""SCPO for the residual policy of any plant: the client of ``scpo.SCPOProjector`` the node runs.

The projector is generic; this module supplies what is specific to the residual policy: the
constraint functions (batched closed-loop rollouts, ``rollout.PlantRollout``, on initial
states of the plant's certified region), the names of their metrics (``rollout.METRICS``),
one margin per metric, and the weights of the backup itself.

The metrics are fractions of each constraint's range (``rollout`` module docstring), so the
margins below are fractions too and fit every plant: calibrated on the double integrator to
keep its former absolute margins (0.02 of a unit limit in the projection, 0.005 at
certification: 1.1 % and 0.3 % of the 1.8 the region leaves below the position limit).
"""
from __future__ import annotations

import numpy as np
import torch

from .rollout import METRICS, PlantRollout, SafetySpec, state_set, structured_states
from .scpo import Decision, SCPOConfig, SCPOProjector

_METRIC_MARGINS = {
    # metric: (m_i kept in the projection, c_i required at certification), fractions of a range
    "state": (0.01, 0.003),
    "input": (0.01, 0.0025),
    # in units of δ ε (rollout: the backup's own value is about -(1 - lyap_alpha) = -0.7): near the
    # shell V ≈ ε, where its maximum sits, the metric moves less per weight change than the box
    # metrics; 0.12 / 0.06 are the double integrator's former 4e-3 / 2e-3 in units of ε
    "lyapunov": (0.2, 0.1),
    "safe_set": (0.01, 0.0025),
}
DEFAULT_MARGINS = tuple(_METRIC_MARGINS[m][0] for m in METRICS)
"""``SCPOConfig.margins``, one per metric of ``rollout.METRICS`` (fractions)."""
DEFAULT_CERT_MARGINS = tuple(_METRIC_MARGINS[m][1] for m in METRICS)
"""``SCPOConfig.cert_margins``, one per metric of ``rollout.METRICS`` (fractions)."""


def backup_weights(layout, seed: int = 0) -> np.ndarray:
    """Flat weights of a residual that outputs exactly zero (the policy is the backup)."""
    return layout.initial_parameters(seed).numpy().astype(np.float32)


class ResidualSCPO:
    """SCPO for the residual policy on any ``Plant`` under its backup: the client the ROS node wraps.

    Holds the last certified flat weights in ``theta`` (float32 numpy). Every weight vector it
    ever holds has passed certification on ``n_cert_states`` fresh initial conditions of
    ``plant.region`` (or is the backup itself: a residual with its last layer at zero).
    ``config=None`` means ``default_config()``; a given config is used as it is. ``safe_set``:
    the envelope's set (a ``SafeActionSet``, or its rows) that the ``safe_set`` metric keeps the
    commands in; None: the rollout's default (robust to one late command).
    """

    @staticmethod
    def default_config(**fields) -> SCPOConfig:
        """``SCPOConfig(**fields)`` with this client's per-metric margins unless ``fields`` set them."""
        fields.setdefault("margins", DEFAULT_MARGINS)
        fields.setdefault("cert_margins", DEFAULT_CERT_MARGINS)
        return SCPOConfig(**fields)

    def __init__(self, plant, backup, layout, config: SCPOConfig | None = None, safety: SafetySpec | None = None,
                 n_sample_states: int = 256, n_cert_states: int = 1024, seed: int = 0, device: str = "cpu",
                 safe_set=None):
        if n_sample_states < 8 or n_cert_states < 8:
            raise ValueError("n_sample_states and n_cert_states must be >= 8")
        self.worst_case_backup = backup.certify(plant.region)   # refuse a backup that is not safe
        self.plant, self.backup, self.layout = plant, backup, layout
        self.config = config if config is not None else self.default_config()
        self.safety = safety if safety is not None else SafetySpec()
        self.n_sample_states, self.n_cert_states = int(n_sample_states), int(n_cert_states)
        self.engine = PlantRollout(plant, backup, layout, self.safety, safe_rows=safe_set, device=device, seed=seed)
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self.sample_structured = structured_states(plant, max_points=self.n_sample_states // 2, seed=seed)
        self.cert_structured = structured_states(plant, max_points=self.n_cert_states // 2, seed=seed + 1)
        self.backup_theta = backup_weights(layout, seed)
        self.theta = self.backup_theta.copy()
        self.projector = SCPOProjector(self._sample_g, self._certify_g, self.config, METRICS, seed=seed)

    @property
    def region(self):
        """The certified region (``plant.region``): the box of states and references covered."""
        return self.plant.region

    def _g_on_fresh_states(self, params, count, structured):
        x0, r = state_set(self.plant, count, self.rng, structured)
        return self.engine.evaluate(params, x0, r).g

    def _sample_g(self, params):
        return self._g_on_fresh_states(params, self.n_sample_states, self.sample_structured)

    def _certify_g(self, params):
        return self._g_on_fresh_states(params, self.n_cert_states, self.cert_structured)

    def propose_step(self, delta_raw) -> Decision:
        """One SCPO step from ``theta`` along the raw update ``delta_raw``."""
        theta = torch.as_tensor(self.theta, dtype=torch.float32)
        new, decision = self.projector.step(theta, torch.as_tensor(np.asarray(delta_raw), dtype=torch.float32))
        if decision.committed:
            self.theta = new.numpy().astype(np.float32)
        decision.covers = self.engine.covers
        return decision

    def propose_weights(self, theta_proposed) -> Decision:
        """One SCPO step from ``theta`` towards externally proposed weights."""
        theta_proposed = np.asarray(theta_proposed, dtype=np.float32).reshape(-1)
        if theta_proposed.shape != self.theta.shape:
            return Decision(status="rejected", step=self.projector.steps,
                            reason=f"expected {self.theta.size} weights, got {theta_proposed.size}")
        return self.propose_step(theta_proposed - self.theta)

    def use_plant(self, plant, backup=None, safe_set=None) -> Decision:
        """Switch to ``plant`` (e.g. ``plant.with_limits(...)``: limits tightened at runtime) and
        re-certify ``theta`` there (``recertify``: the backup's weights if it fails). ``backup``:
        None builds the plant's ``LQRBackup``. Raises ``BackupCertificationError`` (nothing
        changed) when the backup no longer certifies the region."""
        if backup is None:
            from .backup import LQRBackup
            backup = LQRBackup(plant)
        worst = backup.certify(plant.region)
        engine = PlantRollout(plant, backup, self.layout, self.safety, safe_rows=safe_set, device=self.engine.device,
                              seed=self.seed)
        self.sample_structured = structured_states(plant, max_points=self.n_sample_states // 2, seed=self.seed)
        self.cert_structured = structured_states(plant, max_points=self.n_cert_states // 2, seed=self.seed + 1)
        self.plant, self.backup, self.engine, self.worst_case_backup = plant, backup, engine, worst
        return self.recertify()

    def recertify(self) -> Decision:
        """Re-check ``theta`` (e.g. after limits changed); fall back to the backup's weights if it fails."""
        decision = self.projector.recertify(torch.as_tensor(self.theta))
        if not decision.committed:
            self.theta = self.backup_theta.copy()
            decision.reason = "re-certification failed: reverted to the backup"
        decision.covers = self.engine.covers
        return decision
