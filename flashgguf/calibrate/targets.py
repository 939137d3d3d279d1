"""What "active" means for a neuron, from a layer's true activations on calibration tokens.

ReLU family: a neuron is active when its activation is non-zero. SiLU/GELU gates: every
neuron is non-zero, so a neuron is active when its contribution |h_i| * ||down_i|| is above
a per-layer threshold, set either for a share of neurons kept or for a bound on the layer's
relative output error ||y - y_kept|| / ||y||.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CalibrationError
from ..predictor import activate

RELU_FAMILY = ("relu", "relu2", "fatrelu", "drelu")


@dataclass(frozen=True)
class LayerWeights:
    """A layer's FFN as float32: gate/up [n_ff, n_embd] (gate None if not gated), down
    [n_embd, n_ff], biases or None."""

    gate: np.ndarray | None
    up: np.ndarray
    down: np.ndarray
    gate_bias: np.ndarray | None = None
    up_bias: np.ndarray | None = None

    @property
    def decider(self) -> np.ndarray:
        """The projection whose sign or size decides activity."""
        return self.gate if self.gate is not None else self.up

    def hidden(self, x: np.ndarray, activation: str, threshold: float = 0.0) -> np.ndarray:
        """h = act(gate x) * (up x) (dReLU: relu on up too), or act(up x) without a gate:
        [n_tokens, n_ff]; threshold is fatrelu's."""
        u = x @ self.up.T
        if self.up_bias is not None:
            u += self.up_bias
        if self.gate is None:
            return activate(activation, u, threshold)
        g = x @ self.gate.T
        if self.gate_bias is not None:
            g += self.gate_bias
        if activation == "drelu":
            u = np.maximum(u, 0.0)
        return activate(activation, g, threshold) * u


@dataclass(frozen=True)
class Target:
    """keep: share of (token, neuron) pairs kept; max_error: bound on the mean relative
    output error. Exactly one is set (ignored for the ReLU family)."""

    keep: float | None = None
    max_error: float | None = None

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.max_error is None):
            raise CalibrationError("give exactly one of a keep share and an error bound")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise CalibrationError(f"keep share {self.keep} is not in (0, 1]")
        if self.max_error is not None and not 0.0 <= self.max_error < 1.0:
            raise CalibrationError(f"error bound {self.max_error} is not in [0, 1)")


def relative_error(h: np.ndarray, down: np.ndarray, mask: np.ndarray) -> float:
    """Mean over tokens of ||down (h * ~mask)|| / ||down h||."""
    full = h @ down.T
    dropped = (h * ~mask) @ down.T
    num = np.linalg.norm(dropped, axis=1)
    den = np.maximum(np.linalg.norm(full, axis=1), 1e-30)
    return float((num / den).mean())


def contribution_threshold(contrib: np.ndarray, h: np.ndarray, down: np.ndarray,
                           target: Target, sample_tokens: int = 512) -> float:
    """Per-layer threshold on contributions meeting target (for SiLU/GELU gates)."""
    if target.keep is not None:
        return float(np.quantile(contrib, 1.0 - target.keep)) if target.keep < 1.0 else -1.0
    # error bound: bisect on the quantile, measuring the exact error on a token sample
    idx = np.linspace(0, contrib.shape[0] - 1, min(sample_tokens, contrib.shape[0])).astype(int)
    c, hs = contrib[idx], h[idx]
    lo, hi = 0.0, 1.0  # share of pairs dropped
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        t = float(np.quantile(c, mid))
        if relative_error(hs, down, c > t) <= target.max_error:
            lo = mid
        else:
            hi = mid
    return float(np.quantile(c, lo)) if lo > 0.0 else -1.0


@dataclass(frozen=True)
class LayerTargets:
    labels: np.ndarray  # bool [n_tokens, n_ff]
    threshold: float  # contribution threshold (0 for the ReLU family)
    error: float  # mean relative output error of the labelled set, measured


def layer_targets(x: np.ndarray, weights: LayerWeights, activation: str, target: Target,
                  activation_threshold: float = 0.0) -> LayerTargets:
    h = weights.hidden(x, activation, activation_threshold)
    if activation in RELU_FAMILY:
        labels = h != 0.0
        return LayerTargets(labels, 0.0, relative_error(h[:512], weights.down, labels[:512]))
    contrib = np.abs(h) * np.linalg.norm(weights.down, axis=0)[None, :]
    t = contribution_threshold(contrib, h, weights.down, target)
    labels = contrib > t
    return LayerTargets(labels, t, relative_error(h[:512], weights.down, labels[:512]))
