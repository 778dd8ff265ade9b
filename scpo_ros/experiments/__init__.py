"""Experiments, each a module with ``main(argv=None)``; run ``python -m scpo_ros.experiments NAME``."""

EXPERIMENTS = {
    "regression": "scpo_ros.experiments.regression",
    "imitation": "scpo_ros.experiments.imitation",
    "safeguard": "scpo_ros.experiments.safeguard",
    "compare": "scpo_ros.experiments.compare",
    "robust": "scpo_ros.experiments.robust",
}
