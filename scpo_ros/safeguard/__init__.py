"""Action-projection safeguard (methods §2): control-invariant set, exact projection of
actions onto the safe action set, and its differentiable batched layer. ROS-free."""
from .invariant_set import (
                            Polytope,
                            SafeActionSet,
                            double_integrator_safe_set,
                            linear_safe_set,
                            maximal_control_invariant_set,
                            pendulum_safe_set,
                            safe_set_for,
)
from .projection import ProjectionResult, SafeguardProjector, project_batch

__all__ = ["Polytope", "SafeActionSet", "double_integrator_safe_set", "linear_safe_set",
           "maximal_control_invariant_set", "pendulum_safe_set", "safe_set_for", "ProjectionResult",
           "SafeguardProjector", "project_batch"]
