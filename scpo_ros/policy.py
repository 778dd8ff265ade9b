"""Residual policy ``π_θ(x, r) = π_backup(x, r) + φ_θ([x, r])``.

``φ_θ`` is a small tanh MLP whose last layer starts at zero, so a fresh policy *is*
the backup: the safe initialisation SCPO starts from. Weights travel as one flat
float vector in a stable order (layer by layer, weight then bias, row-major), and
``MLPLayout.fingerprint`` names that order and the architecture, so a receiver can
refuse a vector built for another network.

``mlp_forward`` is the one definition of the network (affine layers, tanh between them);
its forms, each for its job, run it with their own affine kernel:
- ``ResidualMLP`` (torch ``nn.Module``): training with autograd.
- ``MLPLayout.batched_forward``: many weight vectors × many inputs at once.
- ``NumpyMLP``: numpy, no torch (references and benchmarks).
Two fused kernels evaluate the same function and are tested against these forms:
``rollout.PlantRollout.evaluate``'s fused path for linear plants (error coordinates, the
offsets ``x_ss(r)`` and ``r`` folded into the first bias) and the control path's
``FoldedPolicy``, whose matrices ``fold_residual_policy`` builds here.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = ("tanh",)


def mlp_forward(layers: Sequence[tuple], h, affine: Callable, activation: Callable):
    """``φ`` on per-layer ``(W, b)``: ``h <- activation(affine(h, W, b))`` for every layer but
    the last, which stays affine. The form picks ``affine`` (its kernel and broadcasting)."""
    last = len(layers) - 1
    for k, (W, b) in enumerate(layers):
        h = affine(h, W, b)
        if k < last:
            h = activation(h)
    return h


def _batched_affine(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.baddbmm(b.unsqueeze(-2), h, W.transpose(-1, -2))


def _numpy_affine(h: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    return h @ W.T + b


@dataclass(frozen=True)
class MLPLayout:
    """Architecture of ``φ_θ``: ``in_dim -> hidden... -> out_dim`` with tanh between layers."""

    in_dim: int
    out_dim: int
    hidden: tuple[int, ...] = (32, 32)
    activation: str = "tanh"

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.in_dim < 1 or self.out_dim < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"layer sizes must be positive: {self}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.in_dim, *self.hidden, self.out_dim)

    @property
    def shapes(self) -> list[tuple[tuple[int, int], tuple[int]]]:
        s = self.sizes
        return [((s[i + 1], s[i]), (s[i + 1],)) for i in range(len(s) - 1)]

    @property
    def size(self) -> int:
        return sum(o * i + o for (o, i), _ in self.shapes)

    @property
    def fingerprint(self) -> str:
        """Short hash of the architecture and the flat order (16 hex digits)."""
        sizes = ",".join(map(str, self.sizes))
        text = f"scpo_ros.mlp/v1;act={self.activation};sizes={sizes};order=W_row_major,b"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def unflatten(self, flat):
        """Per-layer ``(W, b)`` views of ``flat (..., size)``: ``W (..., out, in)``, ``b (..., out)``."""
        if flat.shape[-1] != self.size:
            raise ValueError(f"expected {self.size} parameters for layout {self.fingerprint}, got {flat.shape[-1]}")
        lead = flat.shape[:-1]
        out, i = [], 0
        for (o, n), _ in self.shapes:
            W = flat[..., i:i + o * n].reshape(*lead, o, n)
            i += o * n
            b = flat[..., i:i + o]
            i += o
            out.append((W, b))
        return out

    def initial_parameters(self, seed: int = 0) -> torch.Tensor:
        """Default initialisation with the last layer at zero (φ ≡ 0)."""
        return ResidualMLP(self, seed=seed).flat().detach()

    def batched_forward(self, flat: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """``φ`` for ``N`` weight vectors ``flat (N, size)`` on ``inputs (N, M, in_dim)``.

        Equivalent to running the module N times, as batched matmuls.
        """
        return mlp_forward(self.unflatten(flat), inputs, _batched_affine, torch.tanh)


class ResidualMLP(nn.Module):
    """``φ_θ`` as a torch module with the stable flat order of ``MLPLayout``."""

    def __init__(self, layout: MLPLayout, seed: int = 0):
        super().__init__()
        self.layout = layout
        gen = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        sizes = layout.sizes
        for k in range(len(sizes) - 1):
            lin = nn.Linear(sizes[k], sizes[k + 1])
            bound = 1.0 / np.sqrt(sizes[k])
            with torch.no_grad():
                if k == len(sizes) - 2:
                    lin.weight.zero_()
                    lin.bias.zero_()
                else:
                    lin.weight.uniform_(-bound, bound, generator=gen)
                    lin.bias.uniform_(-bound, bound, generator=gen)
            layers.append(lin)
            if k < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        layers = [(lin.weight, lin.bias) for lin in self._linears()]
        return mlp_forward(layers, inputs, F.linear, torch.tanh)

    def flat(self) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for lin in self._linears() for t in (lin.weight, lin.bias)])

    def load_flat(self, flat) -> None:
        flat = torch.as_tensor(flat, dtype=torch.float32)
        with torch.no_grad():
            for lin, (W, b) in zip(self._linears(), self.layout.unflatten(flat)):
                lin.weight.copy_(W)
                lin.bias.copy_(b)

    def _linears(self) -> list[nn.Linear]:
        return [m for m in self.net if isinstance(m, nn.Linear)]


class WeightsRejected(ValueError):
    """A proposed weight vector is unusable (size, fingerprint, non-finite)."""


def check_weights(layout: MLPLayout, flat, fingerprint: str | None = None) -> np.ndarray:
    """Validate an incoming flat vector; return it as float64 numpy or raise ``WeightsRejected``."""
    if fingerprint is not None and fingerprint != layout.fingerprint:
        raise WeightsRejected(f"layout fingerprint {fingerprint!r} does not match {layout.fingerprint!r} "
                              f"(sizes {layout.sizes})")
    arr = np.asarray(flat, dtype=np.float64).reshape(-1)
    if arr.size != layout.size:
        raise WeightsRejected(f"expected {layout.size} weights, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise WeightsRejected(f"{bad} of {arr.size} weights are NaN or Inf")
    return arr


class NumpyMLP:
    """``φ_θ`` in numpy for inputs ``(..., in_dim)``; layer matrices copied once per ``load``."""

    def __init__(self, layout: MLPLayout, flat=None):
        self.layout = layout
        self.load(np.zeros(layout.size) if flat is None else flat)

    def load(self, flat) -> None:
        flat = np.asarray(flat, dtype=np.float64)
        self.layers = [(np.ascontiguousarray(W), np.ascontiguousarray(b))
                       for W, b in self.layout.unflatten(flat)]

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        return mlp_forward(self.layers, np.asarray(inputs, dtype=np.float64), _numpy_affine, np.tanh)


def fold_residual_policy(base_gain: np.ndarray, layout: MLPLayout | None, theta) -> list[np.ndarray]:
    """``u = base_gain·z + φ_θ(z)`` as matrices on the augmented input ``[z, 1]`` (``z`` =
    ``policy_inputs(x, r)``; ``base_gain`` (d, in_dim): the backup's linear part, the columns of
    ``LQRBackup.input_gain()`` but its last. That last column is the backup's constant term
    (``u_ss`` of a plant with an affine term ``c``; zero otherwise): it is the caller's to add,
    as ``control_law.FoldedPolicy`` does, on the constant 1 of the augmented input).

    Every bias becomes a column. Each matrix but the last maps ``[h, 1, u_b]`` to
    ``[W h + b, 1, u_b]``: the layer's pre-activations (the caller applies tanh to those,
    the first ``rows - 1 - d`` entries), a constant 1 for the next bias, and the backup's
    action carried through unchanged; the last adds ``u_b`` by an identity block. With no
    hidden layer, or without ``theta`` (the backup alone), the law is one affine matrix.
    """
    K = np.asarray(base_gain, dtype=np.float64)
    d = K.shape[0]
    Wb = np.hstack([K, np.zeros((d, 1))])                           # (d, in_dim + 1)
    if theta is None:
        return [np.ascontiguousarray(Wb)]
    layers = [(np.asarray(W, dtype=np.float64), np.asarray(b, dtype=np.float64))
              for W, b in layout.unflatten(np.asarray(theta, dtype=np.float64))]
    if len(layers) == 1:
        W, b = layers[0]
        return [np.ascontiguousarray(np.hstack([W, b[:, None]]) + Wb)]
    W0, b0 = layers[0]
    h0 = W0.shape[0]
    first = np.zeros((h0 + 1 + d, W0.shape[1] + 1))
    first[:h0, :-1], first[:h0, -1], first[h0, -1], first[h0 + 1:] = W0, b0, 1.0, Wb
    return [first] + [_carry(W, b, d, last=False) for W, b in layers[1:-1]] + [_carry(*layers[-1], d, last=True)]


def _carry(W: np.ndarray, b: np.ndarray, d: int, last: bool) -> np.ndarray:
    """``[h, 1, u_b] -> [W h + b, 1, u_b]`` (hidden) or ``W h + b + u_b`` (last)."""
    n_out, n_in = W.shape
    M = np.zeros((n_out + (0 if last else 1 + d), n_in + 1 + d))
    M[:n_out, :n_in], M[:n_out, n_in] = W, b
    if last:
        M[:, n_in + 1:] = np.eye(d)
    else:
        M[n_out, n_in] = 1.0
        M[n_out + 1:, n_in + 1:] = np.eye(d)
    return M


def policy_inputs(x, r):
    """Input of ``φ``: ``[x, r]`` along the last axis (numpy or torch)."""
    if isinstance(x, torch.Tensor):
        return torch.cat([x, r], dim=-1)
    return np.concatenate([x, r], axis=-1)
