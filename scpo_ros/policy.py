"""Residual policy ``π_θ(x, r) = π_backup(x, r) + φ_θ([x, r])``.

``φ_θ`` is a small tanh MLP whose last layer starts at zero, so a fresh policy *is*
the backup: the safe initialisation SCPO starts from. Weights travel as one flat
float vector in a stable order (layer by layer, weight then bias, row-major), and
``MLPLayout.fingerprint`` names that order and the architecture, so a receiver can
refuse a vector built for another network.

Three evaluations of the same function, each for its job:
- ``ResidualPolicy`` (torch ``nn.Module``): training with autograd.
- ``MLPLayout.batched_forward``: many weight vectors × many inputs at once (rollouts).
- ``NumpyMLP``: one input, no torch, no allocation beyond the layer outputs (control path).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

ACTIVATIONS = ("tanh",)


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
        text = "scpo_ros.mlp/v1;act=%s;sizes=%s;order=W_row_major,b" % (
            self.activation, ",".join(map(str, self.sizes)))
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
        layers = self.unflatten(flat)
        h = inputs
        for k, (W, b) in enumerate(layers):
            h = torch.baddbmm(b.unsqueeze(-2), h, W.transpose(-1, -2))
            if k < len(layers) - 1:
                h = torch.tanh(h)
        return h


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
        return self.net(inputs)

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
    """One-sample evaluation of ``φ_θ`` in numpy for the control path.

    Layer matrices are copied once per weight update (``load``); ``__call__`` does
    a handful of small matmuls into preallocated buffers.
    """

    def __init__(self, layout: MLPLayout, flat=None):
        self.layout = layout
        self._bufs = [np.zeros(o) for (o, _), _ in layout.shapes]
        self.load(np.zeros(layout.size) if flat is None else flat)

    def load(self, flat) -> None:
        flat = np.asarray(flat, dtype=np.float64)
        self.layers = [(np.ascontiguousarray(W), np.ascontiguousarray(b))
                       for W, b in self.layout.unflatten(flat)]

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        h = inputs
        last = len(self.layers) - 1
        for k, ((W, b), buf) in enumerate(zip(self.layers, self._bufs)):
            np.dot(W, h, out=buf)
            buf += b
            if k < last:
                np.tanh(buf, out=buf)
            h = buf
        return h.copy()


def policy_inputs(x, r):
    """Input of ``φ``: ``[x, r]`` along the last axis (numpy or torch)."""
    if isinstance(x, torch.Tensor):
        return torch.cat([x, r], dim=-1)
    return np.concatenate([x, r], axis=-1)
