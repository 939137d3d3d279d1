"""Low-rank activity predictors trained in numpy (no PyTorch).

Per layer: score = B (A x) + bias, A [rank, n_embd], B [n_ff, rank]; a neuron is predicted
active when score > threshold. A and B start from a truncated SVD of the projection that
decides activity (so B A x starts as that projection's pre-activation), then all three are
trained with a class-balanced logistic loss and Adam on calibration tokens, early-stopped on
held-out ones; the threshold is then set on the held-out tokens for the target recall.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CalibrationError


@dataclass(frozen=True)
class TrainOptions:
    rank: int = 128
    target_recall: float = 0.99
    learning_rate: float = 3e-3
    batch_tokens: int = 512
    max_epochs: int = 30
    patience: int = 3  # epochs without held-out improvement before stopping
    held_out: float = 0.2  # share of tokens kept for early stopping and the threshold
    seed: int = 0


@dataclass(frozen=True)
class TrainedPredictor:
    a: np.ndarray  # float32 [rank, n_embd]
    b: np.ndarray  # float32 [n_ff, rank]
    bias: np.ndarray  # float32 [n_ff]
    threshold: float
    recall: float  # on held-out tokens at the threshold
    precision: float
    predicted_share: float  # mean share of neurons predicted active per token
    active_share: float  # mean share truly active
    epochs: int

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def scores(self, x: np.ndarray) -> np.ndarray:
        return (x @ self.a.T) @ self.b.T + self.bias


def _split(n_tokens: int, opts: TrainOptions) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(opts.seed)
    perm = rng.permutation(n_tokens)
    n_val = max(1, int(round(n_tokens * opts.held_out)))
    if n_tokens - n_val < 1:
        raise CalibrationError(f"{n_tokens} calibration tokens are too few to train on")
    return perm[n_val:], perm[:n_val]


def svd_init(decider: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A, B with B A the best rank-`rank` approximation of decider [n_ff, n_embd]."""
    u, s, vt = np.linalg.svd(decider.astype(np.float64), full_matrices=False)
    r = min(rank, s.size)
    root = np.sqrt(s[:r])
    a = (root[:, None] * vt[:r]).astype(np.float32)
    b = (u[:, :r] * root[None, :]).astype(np.float32)
    if r < rank:  # a rank above the matrix's: pad with zero directions
        a = np.vstack([a, np.zeros((rank - r, a.shape[1]), np.float32)])
        b = np.hstack([b, np.zeros((b.shape[0], rank - r), np.float32)])
    return a, b


def _balanced_loss_grad(s: np.ndarray, y: np.ndarray, w_pos: float,
                        w_neg: float) -> tuple[float, np.ndarray]:
    """Mean class-weighted logistic loss of logits s for labels y, and d loss / d s."""
    p = 0.5 * (1.0 + np.tanh(0.5 * s))  # sigmoid without overflow
    w = np.where(y, w_pos, w_neg).astype(np.float32)
    # log(1 + exp(-|s|)) + max(s, 0) - y s  ==  -log p(y | s)
    nll = np.logaddexp(0.0, -np.abs(s)) + np.maximum(s, 0.0) - y * s
    n = s.size
    return float((w * nll).sum() / n), (w * (p - y) / n).astype(np.float32)


def _threshold_for_recall(scores: np.ndarray, labels: np.ndarray, target: float) -> float:
    """Largest threshold t with recall(score > t) >= target over all positives."""
    pos = np.sort(scores[labels])
    if pos.size == 0:
        return float(np.inf)
    k = int(np.floor((1.0 - target) * pos.size))  # positives allowed below t
    return float(np.nextafter(pos[k], -np.inf)) if k < pos.size else float(pos[-1])


def train_predictor(x: np.ndarray, labels: np.ndarray, decider: np.ndarray,
                    opts: TrainOptions) -> TrainedPredictor:
    """x [n_tokens, n_embd] FFN inputs, labels [n_tokens, n_ff] bool (truly active), decider
    [n_ff, n_embd] the projection whose SVD starts the predictor."""
    if x.ndim != 2 or labels.shape != (x.shape[0], decider.shape[0]):
        raise CalibrationError(f"labels {labels.shape} do not match inputs {x.shape} and "
                               f"{decider.shape[0]} neurons")
    if not 0.0 < opts.target_recall <= 1.0:
        raise CalibrationError(f"target recall {opts.target_recall} is not in (0, 1]")
    train_idx, val_idx = _split(x.shape[0], opts)
    x = np.ascontiguousarray(x, dtype=np.float32)
    labels = labels.astype(bool)
    # scale inputs so the SVD start gives logits of order 1 whatever the layer's norms
    a, b = svd_init(decider, opts.rank)
    pre = (x[train_idx[:2048]] @ a.T) @ b.T
    scale = np.float32(1.0 / max(float(pre.std()), 1e-6))
    b *= scale
    bias = np.zeros(decider.shape[0], np.float32)
    p_active = float(labels[train_idx].mean())
    if p_active <= 0.0 or p_active >= 1.0:
        raise CalibrationError(f"every neuron is {'in' if p_active <= 0 else ''}active on the "
                               "calibration tokens: nothing to learn")
    w_pos, w_neg = 0.5 / p_active, 0.5 / (1.0 - p_active)

    params = [a, b, bias]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    rng = np.random.default_rng(opts.seed + 1)
    x_val, y_val = x[val_idx], labels[val_idx]

    def val_loss() -> float:
        s = (x_val @ a.T) @ b.T + bias
        return _balanced_loss_grad(s, y_val, w_pos, w_neg)[0]

    best = (val_loss(), [p.copy() for p in params])
    step, stale, epochs = 0, 0, 0
    for epoch in range(opts.max_epochs):
        epochs = epoch + 1
        order = rng.permutation(train_idx)
        for start in range(0, order.size, opts.batch_tokens):
            idx = order[start:start + opts.batch_tokens]
            xb, yb = x[idx], labels[idx]
            z = xb @ a.T
            s = z @ b.T + bias
            _, ds = _balanced_loss_grad(s, yb, w_pos, w_neg)
            grads = [(ds @ b).T @ xb, ds.T @ z, ds.sum(axis=0)]
            step += 1
            for p, g, mi, vi in zip(params, grads, m, v, strict=True):
                mi *= beta1
                mi += (1 - beta1) * g
                vi *= beta2
                vi += (1 - beta2) * g * g
                mhat = mi / (1 - beta1**step)
                vhat = vi / (1 - beta2**step)
                p -= (opts.learning_rate * mhat / (np.sqrt(vhat) + eps)).astype(np.float32)
        loss = val_loss()
        if loss < best[0] - 1e-5:
            best, stale = (loss, [p.copy() for p in params]), 0
        else:
            stale += 1
            if stale >= opts.patience:
                break
    a, b, bias = best[1]
    s_val = (x_val @ a.T) @ b.T + bias
    threshold = _threshold_for_recall(s_val, y_val, opts.target_recall)
    pred = s_val > threshold
    tp = float((pred & y_val).sum())
    return TrainedPredictor(
        a=a, b=b, bias=bias, threshold=threshold,
        recall=tp / max(float(y_val.sum()), 1.0),
        precision=tp / max(float(pred.sum()), 1.0),
        predicted_share=float(pred.mean()),
        active_share=float(y_val.mean()),
        epochs=epochs,
    )
