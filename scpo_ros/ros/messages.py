"""Message conversions: ``Float64MultiArray`` <-> numpy, and the weight-vector convention."""
from __future__ import annotations

import numpy as np
from std_msgs.msg import Float64MultiArray, MultiArrayDimension


def float64_msg(values, label: str | None = None) -> Float64MultiArray:
    """``Float64MultiArray`` with the values; ``label`` goes into ``layout.dim[0].label``."""
    msg = Float64MultiArray()
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    msg.data = data.tolist()
    if label is not None:
        msg.layout.dim = [MultiArrayDimension(label=label, size=data.size, stride=data.size)]
    return msg


def array_from_float64(msg: Float64MultiArray) -> np.ndarray:
    return np.asarray(msg.data, dtype=np.float64)


def weights_to_msg(flat, fingerprint: str) -> Float64MultiArray:
    """Weight-vector convention: ``data`` = flat weights in ``MLPLayout``'s order,
    ``layout.dim[0].label`` = ``MLPLayout.fingerprint`` (16 hex digits), ``size`` = length."""
    return float64_msg(flat, label=fingerprint)


def weights_from_msg(msg: Float64MultiArray) -> tuple[np.ndarray, str | None]:
    """(flat weights, fingerprint or None when the message carries no layout)."""
    label = msg.layout.dim[0].label if msg.layout.dim else None
    return np.asarray(msg.data, dtype=np.float64), label


def stamp_to_sec(stamp) -> float:
    """Seconds of a ``builtin_interfaces/Time``."""
    return stamp.sec + 1e-9 * stamp.nanosec
