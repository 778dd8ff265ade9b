"""SCPO for the residual policy of a double integrator: the client of ``scpo.SCPOProjector`` the node runs.

The projector is generic; this module supplies what is specific to the plant: the
constraint functions (batched closed-loop rollouts, ``rollout.DoubleIntegratorRollout``,
on initial states of the certified region), the names of their metrics
(``rollout.METRICS``), one margin per metric, and the weights of the backup itself.
"""
from __future__ import annotations

import numpy as np
import torch

from .rollout import METRICS, DoubleIntegratorRollout, SafetySpec, state_set, structured_states
from .scpo import Decision, SCPOConfig, SCPOProjector

_METRIC_MARGINS = {
    # metric: (m_i kept in the projection, c_i required at certification)
    "position": (0.02, 0.005),    # distances to a limit, in the limit's unit (defaults 1.0)
    "velocity": (0.02, 0.005),
    "actuation": (0.02, 0.005),
    # a difference of V-levels: near the shell V ≈ ε, where its maximum sits, it is an order
    # of magnitude smaller than the box metrics, and a 0.02 margin would freeze learning
    "lyapunov": (2e-3, 1e-3),
    "safe_set": (0.02, 0.005),    # a distance (the safe set's rows have unit-norm state normals)
}
DEFAULT_MARGINS = tuple(_METRIC_MARGINS[m][0] for m in METRICS)
"""``SCPOConfig.margins`` for the double integrator, one per metric of ``rollout.METRICS``."""
DEFAULT_CERT_MARGINS = tuple(_METRIC_MARGINS[m][1] for m in METRICS)
"""``SCPOConfig.cert_margins`` for the double integrator, one per metric of ``rollout.METRICS``."""


def backup_weights(layout, seed: int = 0) -> np.ndarray:
    """Flat weights of a residual that outputs exactly zero (the policy is the backup)."""
    return layout.initial_parameters(seed).numpy().astype(np.float32)


class ResidualSCPO:
    """SCPO for the residual policy on a ``DoubleIntegrator``: the client the ROS node wraps.

    Holds the last certified flat weights in ``theta`` (float32 numpy). Every weight
    vector it ever holds has passed certification on ``n_cert_states`` fresh initial
    conditions (or is the backup itself: a residual with its last layer at zero).
    ``config=None`` means ``default_config()``; a given config is used as it is.
    """

    @staticmethod
    def default_config(**fields) -> SCPOConfig:
        """``SCPOConfig(**fields)`` with this client's per-metric margins unless ``fields`` set them."""
        fields.setdefault("margins", DEFAULT_MARGINS)
        fields.setdefault("cert_margins", DEFAULT_CERT_MARGINS)
        return SCPOConfig(**fields)

    def __init__(self, system, backup, layout, initial_set, config: SCPOConfig | None = None,
                 safety=None, n_sample_states: int = 256, n_cert_states: int = 1024, seed: int = 0,
                 device: str = "cpu", safe_set=None):
        if n_sample_states < 8 or n_cert_states < 8:
            raise ValueError("n_sample_states and n_cert_states must be >= 8")
        self.worst_case_backup = backup.certify(initial_set)   # refuse a backup that is not safe
        self.system, self.backup, self.layout, self.initial_set = system, backup, layout, initial_set
        self.config = config if config is not None else self.default_config()
        self.safety = safety if safety is not None else SafetySpec()
        self.n_sample_states, self.n_cert_states = int(n_sample_states), int(n_cert_states)
        # safe_set: the envelope's (``safeguard.invariant_set.SafeActionSet``); None = the default
        # the rollout builds (robust to one late command)
        self.engine = DoubleIntegratorRollout(system, backup, layout, self.safety, device=device,
                                              safe_rows=None if safe_set is None else safe_set.affine_rows())
        self.rng = np.random.default_rng(seed)
        self.sample_structured = structured_states(initial_set, system.dof, max_points=self.n_sample_states // 2)
        self.cert_structured = structured_states(initial_set, system.dof, max_points=self.n_cert_states // 2,
                                                 seed=seed + 1)
        self.backup_theta = backup_weights(layout, seed)
        self.theta = self.backup_theta.copy()
        self.projector = SCPOProjector(self._sample_g, self._certify_g, self.config, METRICS, seed=seed)

    def _g_on_fresh_states(self, params, count, structured):
        x0, r = state_set(self.initial_set, self.system.dof, count, self.rng, structured)
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
        return decision

    def propose_weights(self, theta_proposed) -> Decision:
        """One SCPO step from ``theta`` towards externally proposed weights."""
        theta_proposed = np.asarray(theta_proposed, dtype=np.float32).reshape(-1)
        if theta_proposed.shape != self.theta.shape:
            return Decision(status="rejected", step=self.projector.steps,
                            reason=f"expected {self.theta.size} weights, got {theta_proposed.size}")
        return self.propose_step(theta_proposed - self.theta)

    def recertify(self) -> Decision:
        """Re-check ``theta`` (e.g. after limits changed); fall back to the backup's weights if it fails."""
        decision = self.projector.recertify(torch.as_tensor(self.theta))
        if not decision.committed:
            self.theta = self.backup_theta.copy()
            decision.reason = "re-certification failed: reverted to the backup"
        return decision
