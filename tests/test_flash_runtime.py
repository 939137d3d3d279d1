"""The streaming runtime: C predictor, budget, window cache, reads, modes, stats."""

from __future__ import annotations

import dataclasses
import errno
import time

import numpy as np
import pytest
from flash_helpers import bundle_rows, convert_open, runtime, svd_predictor
from gguf import GGMLQuantizationType
from model_factory import TinyModel

from flashgguf.errors import BudgetError, MissingPredictorError, NativeError, OptionError
from flashgguf.predictor import predicted_active, predictor_scores

Q = GGMLQuantizationType
pytestmark = pytest.mark.native


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("flash")


@pytest.fixture(scope="module")
def silu(tiny_models, folder):
    """A gated SiLU model with SVD predictors keeping about half the rows."""
    flash = convert_open(tiny_models(TinyModel(ffn_type=Q.Q4_1, n_ff=320)), folder)
    return flash, [svd_predictor(flash, i, 32, 0.5) for i in range(flash.n_layer)]


# A K-quant mix as Q4_K_M stores one (gate/up Q4_K; down Q6_K in some layers, Q4_K in
# others): layers with different part types and strides.
KQUANT_MIX = TinyModel(arch="qwen2", n_layer=2, n_embd=256, n_ff=512, ffn_type=Q.Q4_K,
                       down_types=(Q.Q6_K, Q.Q4_K))


@pytest.fixture(scope="module", params=["q4_1", "kquant-mix"])
def layouts(request, silu, tiny_models, folder):
    """The SiLU model, and a model whose layers have different bundle layouts."""
    if request.param == "q4_1":
        return silu
    flash = convert_open(tiny_models(KQUANT_MIX), folder)
    assert flash.layers[0].layout != flash.layers[1].layout
    return flash, [svd_predictor(flash, i, 32, 0.5) for i in range(flash.n_layer)]


def assert_same_sum(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to the order of float32 sums: streaming adds the rows in the order their reads
    land, the dense engine in a static split, so the same terms are summed in another order.
    That moves a result by ~1e-7 of the outputs' scale, not of each element: an output that
    cancels to near 0 can differ from the dense one by more than 1e-6 relatively (seen: 1.1e-6
    absolute on -1.09e-3, among outputs of order 1)."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def streaming(flash, preds, mode="predicted", share=0.5, **kw):
    """A runtime whose cache holds `share` of each layer's rows (predictors on top)."""
    pred_bytes = 0 if mode != "predicted" else sum(
        p.a.nbytes + p.b.nbytes + p.scale.nbytes + (0 if p.b_up is None else p.b_up.nbytes)
        for p in preds if p is not None)
    budget = pred_bytes + max(1, int(share * flash.payload_nbytes))
    return runtime(flash, preds, mode=mode, dram_budget=budget, read_log=1 << 16, **kw)


def tokens(n: int, n_embd: int, seed: int = 0, repeat: float = 0.3) -> np.ndarray:
    """Random FFN inputs where some tokens repeat recent ones (so the cache gets hits)."""
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(n_embd).astype(np.float32)]
    for _ in range(n - 1):
        if rng.random() < repeat:
            xs.append(xs[-int(rng.integers(1, min(len(xs), 3) + 1))] * 1.01)
        else:
            xs.append(rng.standard_normal(n_embd).astype(np.float32))
    return np.stack(xs)


# ---- predictor ---------------------------------------------------------------------

@pytest.mark.parametrize("with_up", [True, False])
def test_c_predictor_matches_the_reference(silu, with_up):
    flash, _ = silu
    preds = [svd_predictor(flash, i, 32, 0.4, with_up=with_up) for i in range(flash.n_layer)]
    rt = streaming(flash, preds)
    x = np.random.default_rng(7).standard_normal((200, flash.n_embd)).astype(np.float32)
    for layer in range(flash.n_layer):
        got = rt.predict(layer, x)
        want = predicted_active(preds[layer], flash.activation, x)
        assert 0.2 < want.mean() < 0.6  # the threshold really selects
        assert (got == want).mean() >= 0.995


def _with_sigma(pred, seed: int, with_up: bool = True):
    # residuals about as large as the predicted pre-activations, per neuron
    rng = np.random.default_rng(seed)
    n_ff = pred.scale.size
    sigma_g = rng.uniform(0.0, 2.0, n_ff).astype(np.float32)
    sigma_u = rng.uniform(0.0, 2.0, n_ff).astype(np.float32) if with_up else None
    return dataclasses.replace(pred, sigma_g=sigma_g, sigma_u=sigma_u)


@pytest.mark.parametrize("with_up", [True, False])
def test_c_expected_score_matches_the_reference(silu, with_up):
    flash, _ = silu
    plain = [svd_predictor(flash, i, 32, 0.4, with_up=with_up) for i in range(flash.n_layer)]
    preds = [_with_sigma(p, i, with_up) for i, p in enumerate(plain)]
    x = np.random.default_rng(7).standard_normal((200, flash.n_embd)).astype(np.float32)
    # the same threshold selects differently once residuals count: the score really changed
    preds = [dataclasses.replace(p, threshold=float(np.quantile(
        predictor_scores(p, flash.activation, x), 0.6))) for p in preds]
    rt = streaming(flash, preds)
    for layer in range(flash.n_layer):
        got = rt.predict(layer, x)
        want = predicted_active(preds[layer], flash.activation, x)
        plain_active = predicted_active(dataclasses.replace(
            plain[layer], threshold=preds[layer].threshold), flash.activation, x)
        assert (want != plain_active).mean() > 0.05
        assert (got == want).mean() >= 0.995


def test_zero_residuals_are_the_plain_score(silu):
    flash, _ = silu
    pred = svd_predictor(flash, 0, 32, 0.4)
    zero = dataclasses.replace(pred, sigma_g=np.zeros_like(pred.scale),
                               sigma_u=np.zeros_like(pred.scale))
    x = np.random.default_rng(9).standard_normal((50, flash.n_embd)).astype(np.float32)
    np.testing.assert_allclose(predictor_scores(zero, flash.activation, x),
                               predictor_scores(pred, flash.activation, x), rtol=1e-6)


def test_bad_residuals_are_refused(silu):
    flash, preds = silu
    pred = _with_sigma(svd_predictor(flash, 0, 32, 0.4), 0)
    with pytest.raises(OptionError, match="sigma_u exactly when it has b_up"):
        streaming(flash, [dataclasses.replace(pred, sigma_u=None), preds[1]])
    bad = pred.sigma_g.copy()
    bad[3] = -1.0
    with pytest.raises(NativeError, match="residuals"):
        streaming(flash, [dataclasses.replace(pred, sigma_g=bad), preds[1]])


def test_relu_predictor_matches_the_reference(tiny_models, folder):
    flash = convert_open(tiny_models(TinyModel(ffn_type=Q.Q8_0)), folder, activation="relu")
    preds = [svd_predictor(flash, i, 32, 0.3, with_up=False) for i in range(flash.n_layer)]
    rt = streaming(flash, preds)
    x = np.random.default_rng(8).standard_normal((200, flash.n_embd)).astype(np.float32)
    assert (rt.predict(1, x) == predicted_active(preds[1], "relu", x)).mean() >= 0.995


def test_predicted_mode_without_predictor_is_refused(silu):
    flash, preds = silu
    with pytest.raises(MissingPredictorError, match="layer 1 has none.*convert the model again"):
        streaming(flash, [preds[0], None])
    streaming(flash, [None, None], mode="naive")  # baselines need none


def test_bad_predictor_shape_is_refused(silu):
    flash, preds = silu
    bad = preds[0].__class__(32, preds[0].a[:-1], preds[0].b, None, preds[0].scale, 0.0)
    with pytest.raises(OptionError, match="pred_a must be uint8"):
        streaming(flash, [bad, preds[1]])


# ---- budget ------------------------------------------------------------------------

def test_budget_below_the_predictors_names_the_minimum(silu):
    flash, preds = silu
    pred_bytes = sum(p.a.nbytes + p.b.nbytes + p.b_up.nbytes + p.scale.nbytes for p in preds)
    with pytest.raises(BudgetError, match=r"the minimum is ([\d,]+) bytes") as exc:
        runtime(flash, preds, mode="predicted", dram_budget=1000)
    minimum = int(exc.value.args[0].split("the minimum is ")[1].split(" ")[0].replace(",", ""))
    assert minimum == pred_bytes
    rt = runtime(flash, preds, mode="predicted", dram_budget=minimum)  # the minimum loads
    assert rt.capacity(0) == (0, 0)
    with pytest.raises(BudgetError):
        runtime(flash, preds, mode="predicted", dram_budget=minimum - 1)


@pytest.mark.parametrize("mode", ["naive", "hybrid", "predicted"])
def test_a_budget_without_slots_still_computes_exactly(layouts, mode):
    """Misses are computed from the staging buffers they land in: no slot is needed."""
    flash, preds = layouts
    rt = streaming(flash, preds, mode=mode, share=0.0)
    dense = runtime(flash)
    assert all(rt.capacity(i)[0] == 0 for i in range(flash.n_layer))
    mask = np.random.default_rng(5).random(flash.n_ff) < 0.5
    x = np.random.default_rng(6).standard_normal((3, flash.n_embd)).astype(np.float32)
    for layer in range(flash.n_layer):
        assert_same_sum(rt.ffn(layer, x, mask), dense.ffn(layer, x, mask))


def test_predictors_count_in_the_budget_of_predicted_mode_only(silu):
    flash, preds = silu
    budget = int(0.8 * flash.payload_nbytes)
    stride, n_layer = flash.layout.stride, flash.n_layer
    pred_bytes = sum(p.a.nbytes + p.b.nbytes + p.b_up.nbytes + p.scale.nbytes for p in preds)
    predicted = runtime(flash, preds, mode="predicted", dram_budget=budget)
    hybrid = runtime(flash, preds, mode="hybrid", dram_budget=budget)
    naive = runtime(flash, preds, mode="naive", dram_budget=budget)
    assert predicted.capacity(0)[0] == (budget - pred_bytes) // n_layer // stride
    assert hybrid.capacity(0)[0] == budget // n_layer // stride
    assert naive.capacity(0) == (0, 0)  # naive keeps nothing: the whole layer every token


def test_budget_split_by_layer_weight(silu):
    flash, preds = silu
    stride, n_ff = flash.layout.stride, flash.n_ff
    even = streaming(flash, preds, share=0.5, layer_weights=[1.0, 1.0])
    uneven = streaming(flash, preds, share=0.5, layer_weights=[1.0, 3.0])
    c0, c1 = uneven.capacity(0)[0], uneven.capacity(1)[0]
    assert c0 < even.capacity(0)[0] < c1 <= n_ff
    assert c0 + c1 <= 2 * even.capacity(0)[0] + 1  # the same rows, never past the budget
    # a layer that would take more than all its rows gives the rest to the others
    capped = streaming(flash, preds, share=0.8, layer_weights=[1.0, 1000.0])
    assert capped.capacity(1)[0] == n_ff
    assert capped.capacity(0)[0] * stride + n_ff * stride <= int(0.8 * flash.payload_nbytes)
    assert capped.capacity(0)[0] > streaming(flash, preds, share=0.8,
                                             layer_weights=[1.0, 1.0]).capacity(0)[0] // 2
    with pytest.raises(OptionError, match="weight"):
        streaming(flash, preds, layer_weights=[1.0, 0.0])


def test_budget_follows_the_files_expected_activity(silu):
    flash, _ = silu
    dens = [layer.predictor_density for layer in flash.layers]
    if any(d is None for d in dens):
        pytest.skip("this converter stores no predictor density")
    budget = int(0.9 * flash.payload_nbytes)

    def caps(weights):
        rt = runtime(flash, mode="predicted", dram_budget=budget, layer_weights=weights)
        return [rt.capacity(i)[0] for i in range(flash.n_layer)]

    assert caps(None) == caps(dens)  # the default split is by expected active rows
    assert caps([dens[0], 4 * dens[1]])[1] > caps(dens)[1]


def test_budget_split_and_pinning(silu):
    flash, preds = silu
    rt = streaming(flash, preds, share=0.5, pinned_share=0.25, layer_weights=[1.0, 1.0])
    cap, pinned = rt.capacity(0)
    assert cap == int(0.5 * flash.payload_nbytes) // flash.n_layer // flash.layout.stride
    assert pinned == int(0.25 * cap)
    assert rt.stats()["pinned_neurons"] == pinned * flash.n_layer
    rows, _, _ = rt.slots(0)
    assert list(rows[:pinned]) == list(range(pinned))  # hottest rows = the row prefix
    hybrid = streaming(flash, preds, mode="hybrid", share=0.75)
    cap, pinned = hybrid.capacity(1)
    assert pinned == cap == int(0.75 * flash.payload_nbytes) // flash.n_layer // flash.layout.stride


# ---- the window cache --------------------------------------------------------------

@pytest.mark.parametrize("window", [1, 4])
def test_cache_invariants_under_a_random_token_stream(silu, window):
    flash, preds = silu
    rt = streaming(flash, preds, share=0.4, window=window)
    file_rows = [bundle_rows(flash, i) for i in range(flash.n_layer)]
    cap, pinned = rt.capacity(0)
    history: list[set[int]] = []
    evictions = 0
    prev_held: set[int] = set()
    for x in tokens(60, flash.n_embd):
        layer = 0
        need = set(np.flatnonzero(rt.predict(layer, x[None])[0]).tolist()) | set(range(pinned))
        rt.ffn(layer, x[None])
        rows, used, clock = rt.slots(layer)
        held = rows[rows >= 0]
        assert len(rows) == cap and len(set(held.tolist())) == len(held)  # capacity, no dups
        assert list(rows[:pinned]) == list(range(pinned))  # pinned rows never move
        assert set(held.tolist()) <= set(range(flash.n_ff))
        for slot in np.flatnonzero(rows >= 0):  # resident bytes are the file's
            assert rt.resident_row(layer, int(rows[slot])) == file_rows[layer][rows[slot]].tobytes()
        if len(need) <= cap:  # everything this token used stays resident
            assert need <= set(held.tolist())
            assert all(used[np.flatnonzero(rows == r)[0]] == clock for r in need)
        # a row used within the window is only evicted when every slot holds such rows
        # (then counted); this call's own rows streamed in rounds are not evictions
        recent = set().union(*history[-window:]) if history else set()
        evicted_in_window = (prev_held - set(held.tolist())) & recent - need
        s = rt.stats()
        assert len(evicted_in_window) <= s["window_evictions"] - evictions
        evictions = s["window_evictions"]
        history.append(need)
        prev_held = set(held.tolist())
    s = rt.stats()
    assert s["cache_hits"] > 0 and s["cache_misses"] > 0
    assert s["tokens"] == 60


def test_hits_plus_misses_count_the_unpinned_rows_needed(silu):
    flash, preds = silu
    rt = streaming(flash, preds, share=0.6)
    _, pinned = rt.capacity(1)
    total = 0
    for x in tokens(20, flash.n_embd, seed=3):
        total += int(rt.predict(1, x[None])[0][pinned:].sum())
        rt.ffn(1, x[None])
    s = rt.stats()
    assert s["cache_hits"] + s["cache_misses"] == total
    assert s["neurons_computed"] == total + 20 * pinned


# ---- sparse FFN against the dense one ----------------------------------------------

@pytest.mark.parametrize("mode", ["naive", "hybrid", "predicted"])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_oracle_mask_equals_dense_restricted(layouts, mode, n_tokens):
    flash, preds = layouts
    dense = runtime(flash)
    rt = streaming(flash, preds, mode=mode, share=0.6)
    rng = np.random.default_rng(11)
    for step in range(12):
        x = rng.standard_normal((n_tokens, flash.n_embd)).astype(np.float32)
        mask = rng.random(flash.n_ff) < (0.9 if step % 4 == 3 else 0.3)  # some exceed the cache
        layer = step % 2
        assert_same_sum(rt.ffn(layer, x, mask), dense.ffn(layer, x, mask))
    full = np.ones(flash.n_ff, dtype=bool)  # the whole mask is the dense FFN itself
    np.testing.assert_allclose(dense.ffn(0, x, full), dense.ffn(0, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["naive", "hybrid"])
def test_baselines_compute_the_whole_layer(silu, mode):
    flash, preds = silu
    dense = runtime(flash)
    rt = streaming(flash, preds, mode=mode, share=0.6)
    x = np.random.default_rng(12).standard_normal((3, flash.n_embd)).astype(np.float32)
    for _ in range(3):
        assert_same_sum(rt.ffn(1, x), dense.ffn(1, x))
    s = rt.stats()
    _, pinned = rt.capacity(1)
    assert s["cache_hits"] == 0 and s["cache_misses"] == 3 * (flash.n_ff - pinned)


@pytest.mark.parametrize("n_tokens", [1, 6])
def test_predicted_mode_computes_pinned_and_predicted_rows(silu, n_tokens):
    flash, _ = silu
    preds = [svd_predictor(flash, i, 32, 0.15) for i in range(flash.n_layer)]
    dense = runtime(flash)
    rt = streaming(flash, preds, share=0.5)
    _, pinned = rt.capacity(0)
    x = np.random.default_rng(13).standard_normal((n_tokens, flash.n_embd)).astype(np.float32)
    mask = rt.predict(0, x).any(axis=0)  # a prompt loads the union of its rows' predictions
    assert mask.mean() < 0.95
    mask[:pinned] = True
    assert_same_sum(rt.ffn(0, x), dense.ffn(0, x, mask))


# ---- reads -------------------------------------------------------------------------

@pytest.mark.parametrize("direct_io", [True, False])
@pytest.mark.parametrize("gap", [0, 3])
@pytest.mark.parametrize("io", ["threads", "io_uring"])
def test_reader_paths_load_the_files_bytes(layouts, direct_io, gap, io):
    flash, preds = layouts
    dense = runtime(flash)
    rt = streaming(flash, preds, mode="predicted", share=0.5, direct_io=direct_io,
                   coalesce_gap=gap, io=io)
    assert rt.io_backend in ("threads", "io_uring")
    rt.stats(reset=True)
    rng = np.random.default_rng(14)
    for step in range(10):
        x = rng.standard_normal((2, flash.n_embd)).astype(np.float32)
        mask = rng.random(flash.n_ff) < 0.25
        assert_same_sum(rt.ffn(step % 2, x, mask), dense.ffn(step % 2, x, mask))
    off, length, n = rt.read_log()
    s = rt.stats()
    load_reads = n - s["reads"]
    off, length = off[load_reads:], length[load_reads:]
    assert s["reads"] == len(length) > 0
    assert s["bytes_read"] == int(length.sum())  # stats equal the sum of read sizes
    if direct_io:  # the file's direct-I/O alignment (512 on disks with 512-byte sectors)
        align = rt.io_alignment
        assert align in (512, 1024, 2048, 4096) or (align == 1 and not rt.direct_io)
        assert (off % align == 0).all() and (length % align == 0).all()
    else:
        strides = [layer.layout.stride for layer in flash.layers]
        assert all(any(n % s == 0 for s in strides) for n in length)  # exact rows only
    for layer in range(flash.n_layer):
        rows, _, _ = rt.slots(layer)
        file_rows = bundle_rows(flash, layer)
        for r in rows[rows >= 0]:
            assert rt.resident_row(layer, int(r)) == file_rows[r].tobytes()


def test_coalescing_issues_fewer_larger_reads(silu):
    flash, preds = silu
    counts = {}
    for gap in (0, 8):
        rt = streaming(flash, preds, mode="naive", share=0.4, coalesce_gap=gap, direct_io=False)
        rt.stats(reset=True)
        mask = np.zeros(flash.n_ff, dtype=bool)
        mask[::3] = True  # every third row: gaps of two rows
        rt.ffn(0, np.ones((1, flash.n_embd), np.float32), mask)
        counts[gap] = rt.stats()["reads"]
    assert counts[8] < counts[0] / 4


def test_auto_coalescing_reads_through_gaps_cheaper_than_a_read(silu):
    """coalesce_gap -1: misses join one read when the bytes between them are at most
    coalesce_bytes (a read's fixed cost), whatever the stride; not when they cost more."""
    flash, preds = silu
    stride = flash.layout.stride
    mask = np.zeros(flash.n_ff, dtype=bool)
    mask[::3] = True  # gaps of two rows
    x = np.ones((1, flash.n_embd), np.float32)
    counts = {}
    for nbytes in (0, 2 * stride, 2 * stride - 1):
        rt = streaming(flash, preds, mode="naive", share=0.4, coalesce_gap="auto",
                       coalesce_bytes=nbytes, direct_io=False)
        rt.stats(reset=True)
        rt.ffn(0, x, mask)
        counts[nbytes] = rt.stats()["reads"]
    rows = int(mask.sum())
    assert counts[0] == rows and counts[2 * stride - 1] == rows  # each row its own read
    assert counts[2 * stride] < rows / 4  # every gap is worth reading through


@pytest.mark.parametrize("io", ["threads", "io_uring"])
def test_read_errors_surface_and_leave_the_cache_consistent(silu, io):
    flash, preds = silu
    rt = streaming(flash, preds, share=0.4, io=io)
    x = np.random.default_rng(15).standard_normal((1, flash.n_embd)).astype(np.float32)
    rt.fail_reads(errno.EIO, after=0)
    with pytest.raises(NativeError, match="I/O error"):
        rt.ffn(0, x, np.ones(flash.n_ff, dtype=bool))
    rt.fail_reads(0)
    rows, _, _ = rt.slots(0)
    file_rows = bundle_rows(flash, 0)
    for r in rows[rows >= 0]:  # rows whose read failed were dropped, not kept as garbage
        assert rt.resident_row(0, int(r)) == file_rows[r].tobytes()
    dense = runtime(flash)
    assert_same_sum(rt.ffn(0, x), dense.ffn(0, x, _with_pinned(rt, 0, x)))


@pytest.mark.parametrize("io", ["threads", "io_uring"])
@pytest.mark.parametrize("mode", ["naive", "hybrid", "predicted"])
def test_reordered_completions_compute_exactly_at_every_budget(layouts, io, mode):
    """Reads land out of order (every other one late): each call still equals the dense
    FFN over its rows, at budgets from no slot at all to nearly the whole payload, with
    reads small enough that a layer takes many."""
    flash, preds = layouts
    dense = runtime(flash)
    rng = np.random.default_rng(21)
    stride = max(layer.layout.stride for layer in flash.layers)
    for share in (0.0, 0.1, 0.35, 0.7, 0.95):
        rt = streaming(flash, preds, mode=mode, share=share, io=io, io_depth=3,
                       max_read_bytes=2 * stride + 2 * 4096, coalesce_gap=2, direct_io=False)
        rt.delay_reads(2000, every=2)
        for step in range(6):
            n_tokens = 1 if step % 3 else 4
            x = rng.standard_normal((n_tokens, flash.n_embd)).astype(np.float32)
            mask = rng.random(flash.n_ff) < (0.8 if step % 2 else 0.3)
            layer = step % flash.n_layer
            assert_same_sum(rt.ffn(layer, x, mask), dense.ffn(layer, x, mask))
        assert rt.stats()["reads"] > 6  # many reads per call: completions were reordered
        for layer in range(flash.n_layer):  # what the cache kept is the file's bytes
            rows, _, _ = rt.slots(layer)
            file_rows = bundle_rows(flash, layer)
            for r in rows[rows >= 0]:
                assert rt.resident_row(layer, int(r)) == file_rows[r].tobytes()


@pytest.mark.parametrize("io", ["threads", "io_uring"])
def test_bytes_needed_counts_missed_rows(layouts, io):
    flash, preds = layouts
    rt = streaming(flash, preds, share=0.3, io=io, coalesce_gap=4)
    rt.stats(reset=True)
    rng = np.random.default_rng(22)
    needed = 0
    for step in range(8):
        layer = step % flash.n_layer
        before = rt.stats()["cache_misses"]
        rt.ffn(layer, rng.standard_normal((1, flash.n_embd)).astype(np.float32),
               rng.random(flash.n_ff) < 0.4)
        needed += (rt.stats()["cache_misses"] - before) * flash.layers[layer].layout.stride
    s = rt.stats()
    assert s["bytes_needed"] == needed > 0
    assert s["bytes_read"] >= s["bytes_needed"]  # over-fetch >= 1: gaps and alignment


def test_a_call_waiting_on_the_device_takes_no_cpu(silu):
    """The FFN waits for a slow read blocked (condition variable), not spinning: the
    process's CPU time over a call whose read lands 300 ms late stays far below 300 ms."""
    flash, preds = silu
    rt = streaming(flash, preds, mode="naive", share=0.1, io="threads", n_threads=2)
    x = np.ones((1, flash.n_embd), np.float32)
    rt.ffn(0, x)  # warm up threads
    rt.delay_reads(300_000, every=1)
    cpu0, wall0 = time.process_time(), time.monotonic()
    rt.ffn(0, x)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    assert wall >= 0.3
    assert cpu < 0.1, f"{cpu:.3f} s of CPU over a {wall:.3f} s call blocked on a read"


def test_auto_io_is_threads(silu):
    flash, preds = silu
    # the measured default (flashgguf-profile io)
    assert streaming(flash, preds).io_backend == "threads"
    assert runtime(flash).io_backend == "none"  # dense: no read engine


def _with_pinned(rt, layer, x):
    mask = rt.predict(layer, x)[0]
    mask[: rt.capacity(layer)[1]] = True
    return mask


@pytest.mark.parametrize("io", ["threads", "io_uring"])
def test_file_truncated_under_the_runtime_is_a_short_read(tiny_models, folder, io):
    flash = convert_open(tiny_models(TinyModel(ffn_type=Q.Q4_1, n_ff=320)), folder)
    rt = runtime(flash, mode="naive", dram_budget=flash.payload_nbytes // 2, io=io)
    with open(flash.path, "r+b") as f:
        f.truncate(flash.layers[-1].bundle.offset + 100)
    with pytest.raises(NativeError, match="ended before"):
        rt.ffn(flash.n_layer - 1, np.ones((1, flash.n_embd), np.float32))


def test_stats_reset_and_consistency(silu):
    flash, preds = silu
    rt = streaming(flash, preds)
    for x in tokens(8, flash.n_embd, seed=4):
        for layer in range(flash.n_layer):
            rt.ffn(layer, x[None])
    s = rt.stats(reset=True)
    assert s["tokens"] == 8
    assert s["time_total_s"] >= s["time_ffn_s"] > 0 and s["time_predict_s"] > 0
    after = rt.stats()
    assert all(after[k] == 0 for k in after if k != "pinned_neurons")
    assert after["pinned_neurons"] == s["pinned_neurons"] > 0


@pytest.mark.parametrize("io", ["threads", "io_uring"])
@pytest.mark.parametrize("kind", ["short", "eintr", "eagain"])
def test_transient_read_faults_are_absorbed(layouts, io, kind):
    """Reads that come back short, or fail once with EINTR or EAGAIN (every other read):
    each call still equals the dense FFN over its rows and the cache holds the file's bytes."""
    flash, preds = layouts
    dense = runtime(flash)
    stride = max(layer.layout.stride for layer in flash.layers)
    rt = streaming(flash, preds, mode="naive", share=0.3, io=io, io_depth=3,
                   max_read_bytes=4 * stride + 2 * 4096, coalesce_gap=2, direct_io=False)
    rt.transient_reads(kind, every=2)
    rng = np.random.default_rng(23)
    for step in range(6):
        x = rng.standard_normal((1 if step % 2 else 3, flash.n_embd)).astype(np.float32)
        mask = rng.random(flash.n_ff) < 0.5
        layer = step % flash.n_layer
        assert_same_sum(rt.ffn(layer, x, mask), dense.ffn(layer, x, mask))
    rt.transient_reads(kind, every=0)
    for layer in range(flash.n_layer):
        rows, _, _ = rt.slots(layer)
        file_rows = bundle_rows(flash, layer)
        for r in rows[rows >= 0]:
            assert rt.resident_row(layer, int(r)) == file_rows[r].tobytes()
