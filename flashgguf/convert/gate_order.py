"""Hot-first row order for gate-resident files: how often each neuron is among a token's
top share by |act(gate)|, the rows flash_mode="gate" reads, measured on calibration inputs.
The hottest rows come first, so the budget's pinned prefix holds the rows read most."""

from __future__ import annotations

import math

import numpy as np

from ..predictor import activate

# tokens per product: bounds the [tokens, n_ff] temporaries
_CHUNK_TOKENS = 256


def gate_frequency(activation: str, gate: np.ndarray, x: np.ndarray, keep: float,
                   gate_bias: np.ndarray | None = None,
                   act_threshold: float = 0.0) -> np.ndarray:
    """float32 [n_ff]: the share of the inputs x [n, n_embd] whose top ceil(keep x n_ff)
    rows by |act(gate x)| hold each neuron (gate [n_ff, n_embd], original order); an
    activation of exactly 0 is never chosen, as in the runtime (native/gate.c)."""
    n_ff = gate.shape[0]
    k = min(max(math.ceil(keep * n_ff - 0.01), 1), n_ff)
    counts = np.zeros(n_ff, dtype=np.int64)
    w = np.asarray(gate, dtype=np.float32).T
    for t0 in range(0, len(x), _CHUNK_TOKENS):
        g = np.asarray(x[t0:t0 + _CHUNK_TOKENS], dtype=np.float32) @ w
        if gate_bias is not None:
            g += gate_bias
        a = np.abs(activate(activation, g, act_threshold))
        cut = -np.partition(-a, k - 1, axis=1)[:, k - 1:k]  # each token's k-th largest
        counts += ((a >= cut) & (a > 0)).sum(axis=0)
    return (counts / max(len(x), 1)).astype(np.float32)


def order_by_frequency(freq: np.ndarray) -> np.ndarray:
    """int32 row order: the most frequent neuron first (ties in the source order)."""
    return np.argsort(-freq, kind="stable").astype(np.int32)
