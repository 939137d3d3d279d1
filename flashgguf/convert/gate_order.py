"""What the calibration inputs say about a gate-resident file's rows: how often each neuron
is among a token's top share by |act(gate)| (the rows flash_mode="gate" reads; the hottest go
first, so the budget's pinned prefix holds the rows read most), and each layer's relative
output error when each token keeps only that share (the error curves per-layer keeps are
allocated from: flashgguf/gate_keep.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..predictor import activate
from .predictor_fit import output_error

# tokens per product: bounds the [tokens, n_ff] temporaries
_CHUNK_TOKENS = 256
# held-out tokens an error curve is measured on: each point costs an [n, n_ff] x [n_ff, n_embd]
# product
CURVE_TOKENS = 512


def kept_count(keep: float, n_ff: int) -> int:
    """Rows a token keeps: ceil(keep x n_ff), less keep's float32 rounding, as native/gate.c."""
    return min(max(math.ceil(keep * n_ff - 0.01), 1), n_ff)


def _scores(activation: str, gate: np.ndarray, x: np.ndarray, gate_bias: np.ndarray | None,
            act_threshold: float) -> np.ndarray:
    """act(gate x) [n, n_ff] for inputs x [n, n_embd], gate [n_ff, n_embd]."""
    g = np.asarray(x, dtype=np.float32) @ np.asarray(gate, dtype=np.float32).T
    if gate_bias is not None:
        g += gate_bias
    return activate(activation, g, act_threshold)


def _kept_masks(a: np.ndarray, keeps: Sequence[float]) -> list[np.ndarray]:
    """Per share: bool [n, n_ff], the rows at or above each token's kept_count-th largest |a|
    (ties all kept, as the runtime's cut), never an exact 0."""
    mag = np.abs(a)
    masks = []
    for keep in keeps:
        k = kept_count(keep, a.shape[1])
        cut = -np.partition(-mag, k - 1, axis=1)[:, k - 1:k]  # each token's k-th largest
        masks.append((mag >= cut) & (mag > 0))
    return masks


def gate_frequency(activation: str, gate: np.ndarray, x: np.ndarray, keep: float,
                   gate_bias: np.ndarray | None = None,
                   act_threshold: float = 0.0) -> np.ndarray:
    """float32 [n_ff]: the share of the inputs x [n, n_embd] whose top kept_count rows by
    |act(gate x)| hold each neuron (gate [n_ff, n_embd], original order)."""
    counts = np.zeros(gate.shape[0], dtype=np.int64)
    for t0 in range(0, len(x), _CHUNK_TOKENS):
        a = _scores(activation, gate, x[t0:t0 + _CHUNK_TOKENS], gate_bias, act_threshold)
        counts += _kept_masks(a, (keep,))[0].sum(axis=0)
    return (counts / max(len(x), 1)).astype(np.float32)


def gate_error_curve(activation: str, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                     x: np.ndarray, keeps: Sequence[float], gate_bias: np.ndarray | None = None,
                     up_bias: np.ndarray | None = None,
                     act_threshold: float = 0.0) -> np.ndarray:
    """float32 [len(keeps)]: ||y - y_kept|| / ||y|| of the FFN output y = down (act(gate x) *
    (up x)) over the inputs x [n, n_embd] when each token computes only its kept rows (gate,
    up [n_ff, n_embd], down [n_embd, n_ff])."""
    a = _scores(activation, gate, x, gate_bias, act_threshold)
    u = np.asarray(x, dtype=np.float32) @ np.asarray(up, dtype=np.float32).T
    if up_bias is not None:
        u += up_bias
    h = a * u
    down = np.asarray(down, dtype=np.float32)
    full_sq = float(np.square(h @ down.T).sum())
    return np.array([output_error(h, down, mask, full_sq) for mask in _kept_masks(a, keeps)],
                    dtype=np.float32)


def order_by_frequency(freq: np.ndarray) -> np.ndarray:
    """int32 row order: the most frequent neuron first (ties in the source order)."""
    return np.argsort(-freq, kind="stable").astype(np.int32)
