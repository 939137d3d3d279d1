"""The weight-only activity predictor: fitted from the FFN weights alone, no data.

Model of the FFN input without data: RMSNorm's output, x = w * n, where w is the layer's
ffn_norm weight and n a unit-RMS Gaussian vector. Under that model the best rank-r
estimate of the deciding projection W (gate for gated FFNs, up otherwise) is the
truncated SVD of W diag(w) = U S V^T pulled back to x:

    A = S_r^-1 U_r^T W     (z = A x has unit variance per component: good for Q8_0)
    B = U_r S_r            (g_hat = B z = U_r U_r^T W x)

For gated FFNs the up projection is predicted from the same z by least squares under the
same model, B_up = W_up diag(w^2) A^T (A diag(w^2) A^T = I). Measured on SmolLM2 (random
inputs, recall 0.95 of the top 70% contributions): this predicts fewer neurons active than
the SVD of the stacked [W_gate; W_up] at every rank (rank 256: 0.920 vs 0.927 of the
layer; 384: 0.872 vs 0.900), and both beat the gate alone (0.935 at 256): the subspace is
best spent on the gate, which decides the sign and most of the magnitude.

Rank: candidates are multiples of 32 up to the largest whose stored predictor fits in
`max_share` of the layer's bundle bytes (it stays in DRAM, so it must cost much less than
the FFN it saves reading); the rank is the smallest candidate whose predicted density (the
share of neurons loaded at the target recall; for the ReLU family, whose threshold is fixed,
the share of needed neurons missed) is within `rank_tolerance` of the largest candidate's:
a layer whose density keeps falling with rank (a harder layer) gets more.

Threshold: the stored (quantized) predictor's scores on random inputs, set so that the
target share of the "needed" neurons score above it. Needed: for SiLU/GELU gates, the
neurons whose true contribution |act(g) u| ||down_i|| is in the token's top `keep`
share; for the ReLU family (relu, relu2, fatrelu, drelu), the ones whose output is not
zero. For that family the contract's score, e.g. |relu(g_hat)| * ..., is zero exactly
where the predicted neuron is off, so the threshold is 0 and the recall is whatever the
rank gives (the score has no bias that could buy a margin). Recall and density are
measured on held-out random inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import ConvertError
from ..format import constants as C
from ..predictor import (
    PREDICTOR_BLOCK,
    LayerPredictor,
    ThresholdCurve,
    activate,
    expected_abs_activation,
    expected_abs_up,
    predictor_scores,
)
from ..quants import quantize_rows, row_nbytes

Q8_0 = GGMLQuantizationType.Q8_0
RELU_FAMILY = ("relu", "relu2", "fatrelu", "drelu")  # exactly sparse: needed = non-zero
CURVE_ERROR_TOKENS = 1024  # held-out tokens the threshold curve's output errors are taken on


@dataclass(frozen=True)
class PredictorOptions:
    keep: float = C.DEFAULT_PREDICTOR_KEEP
    recall: float | None = None  # None: C.DEFAULT_PREDICTOR_RECALL, weight-only its own
    max_share: float = C.DEFAULT_PREDICTOR_MAX_SHARE
    rank_tolerance: float = 0.01  # density a bigger rank must save to be worth it
    n_samples: int = 512  # random inputs for fitting, and as many held out
    seed: int = 0
    expected_score: bool = True  # calibrated: store residuals (the expected score)

    def check(self) -> None:
        for name, value in (("--predictor-keep", self.keep),
                            ("--predictor-recall", self.recall)):
            if value is None and name == "--predictor-recall":
                continue
            if not 0.0 < value <= 1.0 or not np.isfinite(value):
                raise ConvertError(f"{name} {value} is not in (0, 1]")
        if not self.max_share > 0.0:
            raise ConvertError(f"predictor max share {self.max_share} must be positive")
        if self.n_samples < 16:
            raise ConvertError(f"predictor samples {self.n_samples} < 16")

    def target_recall(self, calibrated: bool) -> float:
        """The recall the threshold is set for: the given one, else the default for the
        inputs the threshold is set on (random ones overstate recall on real text)."""
        if self.recall is not None:
            return self.recall
        return C.DEFAULT_PREDICTOR_RECALL if calibrated else C.DEFAULT_WEIGHT_ONLY_RECALL


@dataclass(frozen=True)
class FloatPredictor:
    """The fitted predictor before quantization, rows in the original neuron order."""

    a: np.ndarray  # [rank, n_embd]
    b: np.ndarray  # [n_ff, rank]
    b_up: np.ndarray | None
    scale: np.ndarray  # [n_ff]
    sigma_g: np.ndarray | None = None  # [n_ff]: residual RMS of g_hat on the fit inputs
    sigma_u: np.ndarray | None = None  # [n_ff]: same for u_hat (with b_up)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def scores(self, activation: str, x: np.ndarray, act_threshold: float = 0.0,
               dtype: type = np.float64) -> np.ndarray:
        """The contract's score in float64 (or `dtype`), without quantization."""

        def as_dtype(v: np.ndarray | None) -> np.ndarray | None:
            return None if v is None else np.asarray(v, dtype=dtype)

        z = np.asarray(x, dtype=dtype) @ as_dtype(self.a).T
        # products in place: score is a fresh array (the same values as score * ...)
        score = expected_abs_activation(activation, z @ as_dtype(self.b).T,
                                        as_dtype(self.sigma_g), act_threshold)
        if self.b_up is not None:
            u_hat = z @ as_dtype(self.b_up).T
            score *= expected_abs_up(np.maximum(u_hat, 0.0) if activation == "drelu"
                                     else u_hat, as_dtype(self.sigma_u))
        score *= as_dtype(self.scale)
        return score


@dataclass(frozen=True)
class FittedLayer:
    predictor: LayerPredictor  # stored form, rows in bundle order
    float_predictor: FloatPredictor
    recall: float  # on held-out inputs (random, or calibration tokens)
    density: float  # share of neurons predicted active on the held-out inputs
    order: np.ndarray  # int32 [n_ff]: the bundle's row order (row k holds neuron order[k])
    freq: np.ndarray  # float32 [n_ff], row order: share of calibration tokens needing it
    precision: float = 0.0  # predicted neurons that were needed, on the held-out inputs
    curve: ThresholdCurve | None = None  # SiLU/GELU: thresholds for C.PREDICTOR_CURVE_RECALLS
    # float32 [n_ff], row order: share of the held-out inputs each row is predicted active for
    active_freq: np.ndarray | None = None


def predictor_nbytes(n_embd: int, n_ff: int, rank: int, with_up: bool) -> int:
    return (rank * row_nbytes(Q8_0, n_embd) + n_ff * row_nbytes(Q8_0, rank) * (1 + with_up)
            + n_ff * 4)


def random_inputs(norm_weight: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n RMSNorm-like inputs: the norm weight times unit-RMS Gaussian vectors."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, norm_weight.size)) * norm_weight.astype(np.float64)


class _Layer:
    """One layer's weights and its true activity on a set of inputs."""

    def __init__(self, activation: str, act_threshold: float, gate: np.ndarray | None,
                 up: np.ndarray, down: np.ndarray) -> None:
        self.activation = activation
        self.act_threshold = act_threshold
        self.gate = None if gate is None else gate.astype(np.float64)
        # up in float64 only where it decides (ungated): up_cov takes it as it is
        self.up = up.astype(np.float64) if gate is None else np.asarray(up)
        # float32 views of the same weights (no copy for float32 sources)
        self.gate32 = None if gate is None else np.asarray(gate, dtype=np.float32)
        self.up32 = np.asarray(up, dtype=np.float32)
        self.down = np.asarray(down, dtype=np.float32)
        # np.linalg.norm(down, axis=0) in float64 (its sum of squares, the same reduction)
        # without a float64 copy of down
        self.down_norm = np.sqrt(np.add.reduce(np.square(down, dtype=np.float64), axis=0))

    @property
    def decider(self) -> np.ndarray:  # the projection that decides activity
        return self.up if self.gate is None else self.gate

    @property
    def decider32(self) -> np.ndarray:
        return self.up32 if self.gate32 is None else self.gate32

    def hidden(self, x: np.ndarray) -> np.ndarray:
        return ffn_hidden(self.activation, self.gate32, self.up32, x, self.act_threshold)

    def needed(self, h: np.ndarray, keep: float) -> np.ndarray:
        return needed_from_hidden(self.activation, h, self.down_norm, keep)


def ffn_hidden(activation: str, gate: np.ndarray | None, up: np.ndarray, x: np.ndarray,
               act_threshold: float = 0.0) -> np.ndarray:
    """float32 [n, n_ff]: the FFN's hidden values act(gate x) * (up x) (act(up x) ungated),
    original neuron order; drelu applies relu to up too."""
    # float32 is plenty to rank contributions and twice as fast as float64
    x = np.asarray(x, dtype=np.float32)
    h = activate(activation, x @ np.asarray(up if gate is None else gate, np.float32).T,
                 act_threshold)
    if gate is not None:
        u = x @ np.asarray(up, np.float32).T
        h = h * (np.maximum(u, 0.0) if activation == "drelu" else u)
    return h


def needed_from_hidden(activation: str, h: np.ndarray, down_norm: np.ndarray,
                       keep: float) -> np.ndarray:
    """bool [n, n_ff]: the neurons each token needs. ReLU family (relu, relu2, fatrelu above
    its threshold, drelu): the non-zero ones; SiLU/GELU: the top `keep` share by true
    contribution |h_i| ||down_i||."""
    if activation in RELU_FAMILY:
        return h != 0
    contrib = np.abs(h) * down_norm.astype(np.float32)
    kth = np.quantile(contrib, 1.0 - keep, axis=1, keepdims=True)
    return contrib >= kth


def needed_neurons(activation: str, gate: np.ndarray | None, up: np.ndarray,
                   down_norm: np.ndarray, x: np.ndarray, keep: float,
                   act_threshold: float = 0.0) -> np.ndarray:
    """bool [n, n_ff] in the original neuron order: the neurons each token needs
    (needed_from_hidden of the true hidden values)."""
    return needed_from_hidden(activation, ffn_hidden(activation, gate, up, x, act_threshold),
                              down_norm, keep)


def output_error(h: np.ndarray, down: np.ndarray, computed: np.ndarray,
                 full_sq: float | None = None) -> float:
    """Relative error of the layer's FFN output over a set of tokens, ||y - y_computed||_F /
    ||y||_F, when only the `computed` neurons (bool, like h) are: y = h down^T. full_sq:
    ||y||_F^2 when the caller has it."""
    down = np.asarray(down, dtype=np.float32)
    if full_sq is None:
        full_sq = float(np.square(h @ down.T).sum())
    if full_sq == 0.0:
        return 0.0
    missed = np.where(computed, np.float32(0.0), np.asarray(h, dtype=np.float32))
    return float(np.sqrt(np.square(missed @ down.T).sum() / full_sq))


def _misses(n_needed: int, recall: float) -> int:
    """How many of n_needed needed pairs may score at or below the threshold (the index of
    the cut in their ascending scores)."""
    return min(int(np.floor((1.0 - recall) * n_needed)), n_needed - 1)


def _below(cut: float) -> float:
    """The threshold for a cut score: a pair with score == threshold is not predicted (score >
    threshold), so stay just below the cut in float32; never below 0, the format's floor
    (scores are >= 0: a cut at an exact-zero score, which Gemma 3's weight-only fit gave,
    would otherwise store a negative threshold that the reader refuses)."""
    return max(float(np.nextafter(np.float32(cut), np.float32(-np.inf))), 0.0)


def _threshold(scores: np.ndarray, needed: np.ndarray, recall: float) -> float:
    """Largest threshold with at least `recall` of the needed pairs scoring above it. One
    target: the cut is a selection (np.partition, linear time), not a sort."""
    s = scores[needed]
    if s.size == 0:
        return 0.0
    k = _misses(s.size, recall)
    return _below(np.partition(s, k)[k])


class _NeededScores:
    """The needed pairs' scores sorted once: _threshold for any number of recall targets
    (the stored threshold and the curve's grid) at one sort's cost."""

    def __init__(self, scores: np.ndarray, needed: np.ndarray) -> None:
        self.sorted = np.sort(scores[needed])

    def threshold(self, recall: float) -> float:
        if self.sorted.size == 0:
            return 0.0
        return _below(self.sorted[_misses(self.sorted.size, recall)])


def _times_moment(m: np.ndarray, c: np.ndarray) -> np.ndarray:
    """m @ c for a factor of the inputs' second moment; a 1-D c is a diagonal (the weight-only
    model), applied as a column scaling: the same values as m @ diag(c) (each entry is one
    product plus zeros) without an [n, n_embd] x [n_embd, n_embd] product."""
    return m * c if c.ndim == 1 else m @ c


def _svd_basis(decider: np.ndarray, root_cov: np.ndarray, max_rank: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors (the leading max_rank of them; all without) and all singular
    values of decider L (L L^T: the inputs' second moment; 1-D: diagonal), from the small
    Gram matrix."""
    m = _times_moment(decider, root_cov)
    evals, v = np.linalg.eigh(m.T @ m)  # ascending
    evals, v = evals[::-1], v[:, ::-1]
    s = np.sqrt(np.clip(evals, 0.0, None))
    keep = s > s[0] * 1e-6 if s[0] > 0 else np.zeros_like(s, dtype=bool)
    s, v = s[keep], v[:, keep]
    k = s.size if max_rank is None else min(max_rank, s.size)
    return (m @ v[:, :k]) / s[:k], s


def _factors(layer: _Layer, u: np.ndarray, s: np.ndarray, rank: int,
             up_cov: np.ndarray | None) -> FloatPredictor:
    """A, B (and B_up) of the rank-`rank` predictor from the basis (u, s), no residuals.
    up_cov: W_up times the inputs' second moment (gated FFNs)."""
    a = (u[:, :rank].T @ layer.decider) / s[:rank, None]
    b = u[:, :rank] * s[:rank]
    if a.shape[0] < rank:  # fewer non-zero singular values than a Q8_0 block: pad with zeros
        a = np.vstack([a, np.zeros((rank - a.shape[0], a.shape[1]))])
        b = np.hstack([b, np.zeros((b.shape[0], rank - b.shape[1]))])
    b_up = None if up_cov is None else up_cov @ a.T
    return FloatPredictor(a, b, b_up, layer.down_norm)


class _Residuals:
    """The fit inputs' true projections, for the residuals of every rank tried: x W^T does
    not depend on the rank, so it is formed once."""

    def __init__(self, layer: _Layer, x: np.ndarray) -> None:
        self.x = x.astype(np.float32)
        self.decider = self.x @ layer.decider32.T
        self.up = None if layer.gate is None else self.x @ layer.up32.T


def _float_predictor(layer: _Layer, full: FloatPredictor, rank: int,
                     residuals: _Residuals | None) -> FloatPredictor:
    """The rank-`rank` predictor: the leading `rank` components of `full` (the factors at the
    largest rank tried). A's rows are u_i^T W / s_i, B's and B_up's columns are u_i s_i and
    W_up cov a_i: each component depends on its own singular vector only, so these are the
    values _factors gives at `rank` (copied: a kept predictor must not hold the full ones)."""
    a = np.ascontiguousarray(full.a[:rank])
    b = np.ascontiguousarray(full.b[:, :rank])
    b_up = None if full.b_up is None else np.ascontiguousarray(full.b_up[:, :rank])
    # the plain score for the ReLU family (exact zeros decide, threshold 0) and without real
    # inputs: residuals on random inputs say nothing of real ones, and scoring with them
    # missed the few neurons real text needs most (SmolLM2: 5.6x perplexity at 99% computed)
    if layer.activation in RELU_FAMILY or residuals is None:
        return FloatPredictor(a, b, b_up, layer.down_norm)
    # the residuals' RMS per neuron on the fit inputs x: the expected score's spread
    z = residuals.x @ a.T.astype(np.float32)

    def rms(xw: np.ndarray, m: np.ndarray) -> np.ndarray:
        r = xw - z @ m.T.astype(np.float32)
        return np.sqrt(np.mean(np.square(r, dtype=np.float64), axis=0))

    return FloatPredictor(a, b, b_up, layer.down_norm, rms(residuals.decider, b),
                          None if b_up is None else rms(residuals.up, b_up))


def _quantized(fp: FloatPredictor, order: np.ndarray, threshold: float) -> LayerPredictor:
    def q8(m: np.ndarray) -> np.ndarray:
        return quantize_rows(m.astype(np.float32), Q8_0)

    return LayerPredictor(
        rank=fp.rank, a=q8(fp.a), b=q8(fp.b[order]),
        b_up=None if fp.b_up is None else q8(fp.b_up[order]),
        scale=np.ascontiguousarray(fp.scale[order], dtype=np.float32), threshold=threshold,
        sigma_g=None if fp.sigma_g is None else np.ascontiguousarray(fp.sigma_g[order],
                                                                     dtype=np.float32),
        sigma_u=None if fp.sigma_u is None else np.ascontiguousarray(fp.sigma_u[order],
                                                                     dtype=np.float32))


def _rank_candidates(n_embd: int, n_ff: int, n_basis: int, bundle_nbytes: int,
                     with_up: bool, max_share: float) -> list[int]:
    top = max(PREDICTOR_BLOCK, min(n_embd, n_basis) // PREDICTOR_BLOCK * PREDICTOR_BLOCK)
    ranks = [r for r in range(PREDICTOR_BLOCK, top + 1, PREDICTOR_BLOCK)
             if predictor_nbytes(n_embd, n_ff, r, with_up) <= max_share * bundle_nbytes]
    return ranks or [PREDICTOR_BLOCK]


def fit_layer_predictor(activation: str, gate: np.ndarray | None, up: np.ndarray,
                        down: np.ndarray, norm_weight: np.ndarray, order: np.ndarray | None,
                        bundle_nbytes: int, opts: PredictorOptions,
                        seed: int, inputs: tuple[np.ndarray, np.ndarray] | None = None,
                        act_threshold: float = 0.0) -> FittedLayer:
    """Fit one layer. gate/up: dense [n_ff, n_embd]; down: dense [n_embd, n_ff]; norm_weight:
    [n_embd]; order: the bundle's row order (row k holds neuron order[k]), or None for
    hot-first from the inputs' needed-neuron frequencies.

    inputs: real FFN inputs (fit, held out) from calibration; without them, RMSNorm-like
    random inputs. The same fit serves both: the basis is the SVD of W L with L L^T the
    inputs' second moment (diag(w^2) for the random model), so with data it follows the
    directions real inputs use. act_threshold: fatrelu's."""
    n_ff, n_embd = up.shape
    if n_embd % PREDICTOR_BLOCK:
        raise ConvertError(f"n_embd {n_embd} is not a multiple of {PREDICTOR_BLOCK}: "
                           "the predictor cannot be stored in Q8_0 (use --no-predictor)")
    norm_weight = np.asarray(norm_weight, dtype=np.float64).reshape(-1)
    if norm_weight.size != n_embd or not np.all(np.isfinite(norm_weight)):
        raise ConvertError(f"the FFN norm weight has {norm_weight.size} values (need {n_embd}, "
                           "all finite)")
    layer = _Layer(activation, act_threshold, gate, up, down)
    if inputs is None:
        fit_x = random_inputs(norm_weight, opts.n_samples, seed)
        held_x = random_inputs(norm_weight, opts.n_samples, seed + 1_000_003)
        cov, root_cov = norm_weight**2, norm_weight  # diagonal
    else:
        fit_x, held_x = (np.asarray(x, dtype=np.float64) for x in inputs)
        cov, root_cov = _second_moment(fit_x)
    held_h = layer.hidden(held_x)
    fit_need, held_need = layer.needed(layer.hidden(fit_x), opts.keep), \
        layer.needed(held_h, opts.keep)
    if order is None:
        order = np.argsort(-fit_need.mean(axis=0), kind="stable").astype(np.int32)
    # no rank beyond the candidates for a full basis is tried: only their singular vectors
    max_rank = _rank_candidates(n_embd, n_ff, n_embd, bundle_nbytes, gate is not None,
                                opts.max_share)[-1]
    u, s = _svd_basis(layer.decider, root_cov, max_rank)
    if s.size == 0:
        raise ConvertError("the FFN's deciding projection is all zeros: nothing to predict")
    ranks = _rank_candidates(n_embd, n_ff, s.size, bundle_nbytes, gate is not None,
                             opts.max_share)
    recall = opts.target_recall(inputs is not None)

    def cost(fp: FloatPredictor) -> float:
        """What a rank buys, lower is better: the share of neurons loaded at the target
        recall; for the ReLU family (threshold fixed at 0) the share of needed ones missed.
        In float32: a density over n_samples x n_ff pairs moves by ~1e-6 with the rounding
        (the pairs next to the threshold), far below its sampling noise and the tolerance,
        at half the cost of float64."""
        scores = fp.scores(activation, fit_x, act_threshold, np.float32)
        if activation in RELU_FAMILY:
            return 1.0 - float((scores > 0.0)[fit_need].mean()) if fit_need.any() else 0.0
        return float((scores > _threshold(scores, fit_need, recall)).mean())

    fp = _smallest_good_rank(
        layer, _factors(layer, u, s, ranks[-1], None if gate is None else
                        _times_moment(layer.up, cov)),
        # the expected score needs real inputs
        _Residuals(layer, fit_x) if inputs is not None and opts.expected_score else None,
        ranks, cost, opts.rank_tolerance)

    # thresholds and recall from the stored form, which is what the runtime scores with
    pred = _quantized(fp, order, 0.0)
    fit_need_rows, held_need_rows = fit_need[:, order], held_need[:, order]
    # the scores do not depend on the threshold: the held-out ones serve curve and estimates
    held_scores = predictor_scores(pred, activation, held_x, act_threshold)
    curve = None
    if activation not in RELU_FAMILY:
        # the stored threshold and the curve's come from the same fit scores: one sort
        fit_scores = _NeededScores(predictor_scores(pred, activation, fit_x, act_threshold),
                                   fit_need_rows)
        pred = dataclasses.replace(pred, threshold=fit_scores.threshold(recall))
        curve = _threshold_curve(fit_scores, held_scores, held_h[:, order],
                                 layer.down[:, order])
    active = held_scores > pred.threshold  # as predicted_active decides
    recall = float(active[held_need_rows].mean()) if held_need_rows.any() else 1.0
    precision = float(held_need_rows[active].mean()) if active.any() else 1.0
    freq = fit_need.mean(axis=0)[order].astype(np.float32) if inputs is not None \
        else np.zeros(order.size, np.float32)
    return FittedLayer(pred, fp, recall, float(active.mean()), order, freq, precision, curve,
                       active.mean(axis=0).astype(np.float32))


def _smallest_good_rank(layer: _Layer, full: FloatPredictor, residuals: _Residuals | None,
                        ranks: list[int], cost: Callable[[FloatPredictor], float],
                        tolerance: float) -> FloatPredictor:
    """The predictor at the smallest candidate rank whose cost is within `tolerance` of the
    largest's. The cost falls (roughly) monotonically with rank: bisect, each rank's predictor
    taken from `full` (the largest's factors) once."""
    tried: dict[int, FloatPredictor] = {}

    def at(rank: int) -> FloatPredictor:
        if rank not in tried:
            tried[rank] = _float_predictor(layer, full, rank, residuals)
        return tried[rank]

    best = cost(at(ranks[-1]))
    lo, hi = 0, len(ranks) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(at(ranks[mid])) <= best + tolerance:
            hi = mid
        else:
            lo = mid + 1
    return at(ranks[lo])


def _threshold_curve(fit_scores: _NeededScores, held_scores: np.ndarray, held_h: np.ndarray,
                     down: np.ndarray) -> ThresholdCurve:
    """Thresholds for each of C.PREDICTOR_CURVE_RECALLS (set on the fit inputs' needed
    scores, like the stored one) and the density and output error each gives on the held-out
    inputs."""
    targets = np.asarray(C.PREDICTOR_CURVE_RECALLS, dtype=np.float32)
    thresholds = np.array([fit_scores.threshold(float(r)) for r in targets], dtype=np.float32)
    # the error needs an [n, n_ff] x [n_ff, n_embd] product per point: a bounded sample
    n_err = min(held_h.shape[0], CURVE_ERROR_TOKENS)
    h, down = held_h[:n_err].astype(np.float32), np.asarray(down, dtype=np.float32)
    full_sq = float(np.square(h @ down.T).sum())
    density, error = [], []
    for tau in thresholds:
        active = held_scores > tau
        density.append(float(active.mean()))
        error.append(output_error(h, down, active[:n_err], full_sq))
    # the targets ascend, so the thresholds cannot rise (a tie keeps them equal)
    thresholds = np.minimum.accumulate(thresholds)
    return ThresholdCurve(targets, thresholds, np.asarray(density, np.float32),
                          np.asarray(error, np.float32))


def _second_moment(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[x x^T] of the rows of x and its symmetric square root (PSD, clipped at 0)."""
    cov = x.T @ x / x.shape[0]
    evals, v = np.linalg.eigh(cov)
    return cov, (v * np.sqrt(np.clip(evals, 0.0, None))) @ v.T
