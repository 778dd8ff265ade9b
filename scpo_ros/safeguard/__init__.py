"""Action-projection safeguard (methods §2): safe sets of a plant (explicit, implicit, model),
exact projection of actions onto the safe action set, and its differentiable batched layer.
ROS-free. ``safe_set_for(plant, backup=None, late_commands=1)`` is the one entry point."""
from .invariant_set import (
    IMPLICIT_HORIZON_S,
    Polytope,
    SafeActionSet,
    double_integrator_safe_set,
    explicit_safe_set,
    implicit_safe_set,
    linear_safe_set,
    maximal_control_invariant_set,
    pendulum_safe_set,
    safe_set_for,
)
from .projection import ProjectionResult, SafeguardProjector, batch_solver, project_batch

__all__ = ["IMPLICIT_HORIZON_S", "Polytope", "SafeActionSet", "double_integrator_safe_set", "explicit_safe_set",
           "implicit_safe_set", "linear_safe_set", "maximal_control_invariant_set", "pendulum_safe_set",
           "safe_set_for", "ProjectionResult", "SafeguardProjector", "batch_solver", "project_batch"]
