"""The activity predictor stored in a flash GGUF payload, and its numpy reference.

Per layer, a low-rank predictor scores every neuron from the FFN input x:

    z     = A x                 A: [rank, n_embd]   (blk.N.pred_a, Q8_0 rows of n_embd)
    g_hat = B z                 B: [n_ff, rank]     (blk.N.pred_b, Q8_0 rows of rank)
    u_hat = B_up z (optional)   B_up: [n_ff, rank]  (blk.N.pred_b_up, Q8_0 rows of rank)
    score = |act(g_hat)| * (|u_hat| if B_up else 1) * scale      scale: blk.N.pred_scale (F32)

and a neuron is predicted active when score > the layer's threshold. Rows of B, B_up and
scale follow the bundle's row order (hot-first), not the original neuron order.

Format version 2 adds the residual RMS of g_hat and u_hat per neuron (blk.N.pred_sigma_g,
blk.N.pred_sigma_u with B_up; F32 [n_ff], measured on the fit inputs). With them the score is
the expected contribution when g and u are off by Gaussian residuals of that size:

    score = E|act(g_hat + s_g e)| * sqrt(u_hat^2 + s_u^2) * scale,   e ~ N(0, 1)

with the expectation by the 3-point Gauss-Hermite rule (nodes 0, +-sqrt 3; weights 2/3,
1/6). A neuron the low rank sees poorly still scores by how large it can be: measured on
SmolLM2 (tools/predictor_layers.py, 65% of the neurons computed) the relative FFN output
error falls from 0.246 to 0.186 (layer 10) and from 0.220 to 0.137 (layer 20); s = 0 is the
plain score.

g_hat estimates the pre-activation that decides activity (the gate for gated FFNs, up
otherwise); u_hat and scale (the norm of the neuron's down column) turn it into an estimate
of the neuron's contribution |act(g) * u| * ||down_i||, which is what matters for SiLU/GELU
gates. Quantization follows ggml's Q8_0 x Q8_0 dot product: x is quantized to Q8_0 before
A, z before B, so the C predictor and this reference decide alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from .quants import dequantize_rows, quantize_rows

Q8_0 = GGMLQuantizationType.Q8_0
PREDICTOR_BLOCK = 32  # rank and n_embd are whole Q8_0 blocks


@dataclass(frozen=True)
class LayerPredictor:
    rank: int
    a: np.ndarray  # uint8 [rank, row_nbytes(Q8_0, n_embd)]
    b: np.ndarray  # uint8 [n_ff, row_nbytes(Q8_0, rank)]
    b_up: np.ndarray | None  # same as b, or None
    scale: np.ndarray  # float32 [n_ff]
    threshold: float
    sigma_g: np.ndarray | None = None  # float32 [n_ff]: residual RMS of g_hat, or None
    sigma_u: np.ndarray | None = None  # float32 [n_ff] with b_up (and sigma_g), or None


@dataclass(frozen=True)
class ThresholdCurve:
    """One layer's thresholds for a grid of recall targets and what each gave on held-out
    inputs (the converter's calibration or random inputs): a runtime picks a point of the
    quality/sparsity trade-off from it without converting again. Recall targets ascend,
    so thresholds do not increase along the grid."""

    recall_targets: np.ndarray  # float32 [K]: share of the needed neurons kept
    threshold: np.ndarray  # float32 [K]
    density: np.ndarray  # float32 [K]: share of neurons predicted active
    error: np.ndarray  # float32 [K]: relative FFN output error computing only those

    def check_recall(self, recall: float) -> None:
        lo, hi = float(self.recall_targets[0]), float(self.recall_targets[-1])
        if not lo <= recall <= hi:
            raise ValueError(f"recall {recall} is outside the stored curve [{lo:g}, {hi:g}]")

    def threshold_at(self, recall: float) -> float:
        """The threshold for a recall target, linear between grid points."""
        self.check_recall(recall)
        return float(np.interp(recall, self.recall_targets, self.threshold))

    def density_at(self, recall: float) -> float:
        self.check_recall(recall)
        return float(np.interp(recall, self.recall_targets, self.density))

    def threshold_for_error(self, bound: float) -> float:
        """The highest threshold whose measured output error is at most `bound` (linear
        between grid points); the grid's lowest threshold when no point meets it."""
        ok = np.flatnonzero(self.error <= bound)
        if ok.size == 0:
            return float(self.threshold[-1])
        i = int(ok[0])
        if i == 0:
            return float(self.threshold[0])
        e0, e1 = float(self.error[i - 1]), float(self.error[i])  # e0 > bound >= e1
        t = (e0 - bound) / (e0 - e1) if e0 > e1 else 1.0
        return float(self.threshold[i - 1] + t * (self.threshold[i] - self.threshold[i - 1]))


def activate(activation: str, v: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """The FFN activation as the C core applies it (threshold: fatrelu's)."""
    if activation == "silu":  # v / (1 + exp(-v)), in one temporary (same operations)
        v = np.asarray(v)
        t = np.negative(v, out=np.empty(v.shape, np.result_type(v, 1.0)))
        np.exp(t, out=t)
        t += 1.0
        return np.divide(v, t, out=t)
    if activation == "gelu":
        return 0.5 * v * (1.0 + np.tanh(0.7978845608028654 * (v + 0.044715 * v**3)))
    if activation in ("relu", "drelu"):
        return np.maximum(v, 0.0)
    if activation == "fatrelu":
        return np.where(v > threshold, v, 0.0)
    if activation == "relu2":
        return np.maximum(v, 0.0) ** 2
    raise ValueError(f"unknown activation {activation!r}")


GAUSS_HERMITE_NODE = np.float32(1.7320508)  # sqrt(3), as the C core rounds it
GAUSS_HERMITE_WEIGHTS = (np.float32(2.0 / 3.0), np.float32(1.0 / 6.0))


def expected_abs_activation(activation: str, g: np.ndarray, sigma: np.ndarray | None,
                            threshold: float = 0.0) -> np.ndarray:
    """E|act(g + sigma e)|, e ~ N(0, 1), by the 3-point Gauss-Hermite rule; |act(g)| when
    sigma is None."""
    if sigma is None:
        return np.abs(activate(activation, g, threshold))
    d = GAUSS_HERMITE_NODE * sigma
    w0, w1 = GAUSS_HERMITE_WEIGHTS
    return w0 * np.abs(activate(activation, g, threshold)) + w1 * (
        np.abs(activate(activation, g + d, threshold))
        + np.abs(activate(activation, g - d, threshold)))


def expected_abs_up(u: np.ndarray, sigma: np.ndarray | None) -> np.ndarray:
    """E|u + sigma e| as the score takes it: sqrt(u^2 + sigma^2); |u| when sigma is None."""
    return np.abs(u) if sigma is None else np.sqrt(u * u + sigma * sigma)


def _q8_roundtrip(v: np.ndarray) -> np.ndarray:
    """v as the Q8_0 dot product sees it (rows quantized and dequantized)."""
    v = np.atleast_2d(np.asarray(v, dtype=np.float32))
    return dequantize_rows(quantize_rows(v, Q8_0), Q8_0, v.shape[-1])


def predictor_scores(pred: LayerPredictor, activation: str, x: np.ndarray,
                     activation_threshold: float = 0.0) -> np.ndarray:
    """Scores [n_tokens, n_ff] for FFN inputs x [n_tokens, n_embd] (reference for the C code).
    dReLU applies relu to u_hat as well."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    a = dequantize_rows(pred.a, Q8_0, x.shape[1])
    z = _q8_roundtrip(x).astype(np.float64) @ a.T.astype(np.float64)
    zq = _q8_roundtrip(z.astype(np.float32)).astype(np.float64)
    g_hat = zq @ dequantize_rows(pred.b, Q8_0, pred.rank).T.astype(np.float64)
    sigma_g = None if pred.sigma_g is None else pred.sigma_g.astype(np.float64)
    score = expected_abs_activation(activation, g_hat, sigma_g, activation_threshold)
    if pred.b_up is not None:
        u_hat = zq @ dequantize_rows(pred.b_up, Q8_0, pred.rank).T
        sigma_u = None if pred.sigma_u is None else pred.sigma_u.astype(np.float64)
        score = score * expected_abs_up(np.maximum(u_hat, 0.0) if activation == "drelu"
                                        else u_hat, sigma_u)
    return (score * pred.scale.astype(np.float64)).astype(np.float32)


def predicted_active(pred: LayerPredictor, activation: str, x: np.ndarray,
                     activation_threshold: float = 0.0) -> np.ndarray:
    """bool [n_tokens, n_ff]: the neurons the predictor loads."""
    return predictor_scores(pred, activation, x, activation_threshold) > pred.threshold
