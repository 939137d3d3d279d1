"""flashgguf.Llama with the payload streamed under a DRAM budget, and its flash_* options."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from flash_helpers import convert_open, exact_relu_predictor, rel_err, svd_predictor
from gguf import GGMLQuantizationType
from model_factory import TinyModel

from flashgguf import Llama
from flashgguf.archs import get_arch
from flashgguf.errors import BudgetError, MissingPredictorError, OptionError
from flashgguf.evaluate import teacher_forced_logits
from flashgguf.options import (
    FlashOptions,
    budget_argument,
    cgroup_room,
    flash_options,
    parse_budget,
)
from flashgguf.policy import default_mode, expected_read_bytes
from flashgguf.runtime import Runtime

Q = GGMLQuantizationType
TEXT = ("The old man looked at the sea and thought about the long day ahead of him, "
        "the boat, the line and the fish that would come.")
KW = dict(n_ctx=256, n_batch=64, n_ubatch=64, logits_all=True, verbose=False, n_threads=1,
          n_threads_batch=1)


# ---- options (no native code) ------------------------------------------------------

@pytest.mark.parametrize("value, want", [
    (1000, 1000), ("48MiB", 48 << 20), ("1.5GiB", int(1.5 * (1 << 30))), ("2 mb", 2_000_000),
    ("4096", 4096), (0.5, 500), (1.0, 1000),
])
def test_budget_values(value, want):
    assert parse_budget(value, payload_nbytes=1000) == want


@pytest.mark.parametrize("text, want", [
    ("50000000", 50_000_000), ("0.5", 0.5), ("1.0", 1.0), ("32MiB", "32MiB"), (" 7 ", 7),
])
def test_command_line_budgets(text, want):
    """flashgguf-demo --budget: digits are bytes (once read as a fraction > 1 and refused)."""
    got = budget_argument(text)
    assert got == want and type(got) is type(want)
    parse_budget(got, payload_nbytes=1000)  # each is a valid budget


@pytest.mark.parametrize("value", [0, -5, 0.0, 1.5, "lots", "12 parsecs", "-3MiB", True, [1]])
def test_bad_budgets_name_the_parameter(value):
    with pytest.raises(OptionError, match="flash_dram_budget"):
        parse_budget(value, payload_nbytes=1000)


def test_budget_beyond_the_ram_is_lowered_with_a_warning(monkeypatch):
    from flashgguf import options

    monkeypatch.setattr(options, "available_ram", lambda: 11_000)
    with pytest.warns(options.BudgetClampWarning, match="lowered to 8,000 bytes"):
        opts = flash_options(1_000_000, budget=500_000, trunk_nbytes=1_000)
    assert opts.dram_budget == 8_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # what is allocated is at most the payload: a budget above it that fits is kept
        assert flash_options(5_000, budget=50_000, mode="hybrid").dram_budget == 50_000
        assert flash_options(1_000_000, budget=9_000).dram_budget == 9_000
        # nothing is allocated without offload (the page cache holds the payload)
        assert flash_options(1_000_000, budget=500_000, offload=False).mode == "dense"


@pytest.mark.parametrize("kw, name", [
    (dict(mode="smart"), "flash_mode"), (dict(window=0), "flash_window"),
    (dict(window=2.5), "flash_window"), (dict(pinned_share=1.5), "flash_pinned_share"),
    (dict(coalesce_gap=-1), "flash_coalesce_gap"), (dict(coalesce_gap="big"), "flash_coalesce_gap"),
    (dict(io="aio"), "flash_io"),
])
def test_bad_options_name_the_parameter(kw, name):
    with pytest.raises(OptionError, match=name):
        flash_options(1000, budget=500, **kw)


def test_coalesce_gap_auto_is_by_bytes():
    assert flash_options(1000, budget=500).coalesce_gap == "auto"  # the default (by bytes)
    assert flash_options(1000, budget=500, coalesce_gap=8).coalesce_gap == 8


def test_budget_that_holds_the_payload_keeps_it_resident():
    assert flash_options(1000, budget=1.0).budget is None
    assert flash_options(1000, budget=2000).budget is None
    assert flash_options(1000, budget=0.5).budget == 500
    assert flash_options(1000, budget=2000, mode="naive").budget == 2000  # baselines stream


def _cgroup_files(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_cgroup_room_v2_takes_the_tightest_limit_minus_anon(tmp_path):
    _cgroup_files(tmp_path, {
        "cgroup.controllers": "cpu memory",
        "app/memory.max": "1000000000\n", "app/memory.stat": "anon 100000000\nfile 5\n",
        "app/job/memory.max": "max\n", "app/job/memory.stat": "anon 200000000\nfile 7\n",
    })
    assert cgroup_room("0::/app/job\n", tmp_path) == 1_000_000_000 - 200_000_000
    assert cgroup_room("0::/\n", tmp_path) is None  # the root has no limit file


def test_cgroup_room_v1_and_no_limit(tmp_path):
    _cgroup_files(tmp_path, {
        "memory/bench/memory.limit_in_bytes": "890000000\n",
        "memory/bench/memory.stat": "cache 1\nrss 5\ntotal_rss 90000000\n",
        "memory/memory.limit_in_bytes": str(2**63 - 4096),  # v1's "no limit"
    })
    text = "9:cpu:/\n5:memory:/bench\n"
    assert cgroup_room(text, tmp_path) == 800_000_000
    assert cgroup_room("9:cpu:/\n", tmp_path) is None


def test_default_budget_is_what_the_machine_leaves_after_the_trunk(monkeypatch):
    import flashgguf.options as options

    monkeypatch.setattr(options, "available_ram", lambda: 1_000_000)
    assert flash_options(100_000, trunk_nbytes=500_000).budget is None  # fits: resident
    got = flash_options(900_000, trunk_nbytes=500_000).budget
    assert got == int(options.DEFAULT_RAM_SHARE * 500_000)
    assert flash_options(900_000, trunk_nbytes=2_000_000).budget == 1  # no room: stream all


# ---- end to end --------------------------------------------------------------------

@pytest.fixture(scope="module")
def relu_model(tiny_models, tmp_path_factory):
    flash = convert_open(tiny_models(TinyModel(ffn_type=Q.Q8_0, n_ff=320)),
                    tmp_path_factory.mktemp("relu"), activation="relu",
                    predictor=None)  # the tests give their own predictors
    return flash, [exact_relu_predictor(flash, i) for i in range(flash.n_layer)]


@pytest.mark.native
def test_relu_model_with_a_full_recall_predictor_gives_the_dense_outputs(relu_model):
    flash, preds = relu_model
    dense = Llama(str(flash.path), flash_offload=False, **KW)
    tokens = dense.tokenize(TEXT.encode())
    want = teacher_forced_logits(dense, tokens)
    for mode in ("predicted", "naive", "hybrid"):
        llm = Llama(str(flash.path), flash_offload=True, flash_dram_budget=0.6,
                    flash_mode=mode, flash_predictors=preds, **KW)
        got = teacher_forced_logits(llm, tokens)
        # relu: rows outside the prediction are exactly zero; only the order of the float
        # sums differs (a random model amplifies that: dense on 1 vs 2 threads differ ~1e-5)
        assert rel_err(got, want) < 1e-4, mode
        assert llm.flash_stats(reset=True)["tokens"] == len(tokens)
        llm.reset()
        for i, tok in enumerate(tokens[:10]):  # decode: one row at a time, through the cache
            llm.eval([tok])
            assert rel_err(llm.scores[i], want[i]) < 1e-4, (mode, i)
        s = llm.flash_stats()
        assert s["tokens"] == 10
        if mode == "predicted":
            # sparse: fewer rows computed than the dense FFN, and the cache served some
            assert s["neurons_computed"] < 0.8 * 10 * flash.n_ff * flash.n_layer
            assert s["cache_hits"] > 0
        llm.close()
    dense.close()


@pytest.mark.native
def test_stats_keys_and_reset(relu_model):
    flash, preds = relu_model
    llm = Llama(str(flash.path), flash_offload=True, flash_dram_budget="150KiB",
                flash_predictors=preds, **KW)
    llm("Once upon a time", max_tokens=4, temperature=0.0)
    s = llm.flash_stats(reset=True)
    # every counter the C core keeps (fg_stats), window_evictions and bytes_needed included
    assert set(s) >= {"tokens", "bytes_read", "reads", "bytes_needed", "cache_hits",
                      "cache_misses", "neurons_computed", "pinned_neurons", "window_evictions",
                      "time_predict_s", "time_io_wait_s", "time_ffn_s", "time_total_s"}
    assert s["tokens"] > 0 and s["bytes_read"] > 0 and s["time_total_s"] > 0
    assert llm.flash_stats()["tokens"] == 0
    llm.close()


@pytest.mark.native
def test_llama_errors(relu_model, tiny_models, tmp_path):
    flash, _ = relu_model
    with pytest.raises(MissingPredictorError, match="convert the model again"):
        Llama(str(flash.path), flash_offload=True, flash_dram_budget=0.5,
              flash_mode="predicted", **KW)
    with pytest.raises(OptionError, match="flash_mode"):
        Llama(str(flash.path), flash_offload=True, flash_mode="fast", **KW)
    # SiLU model, SVD predictor: runs, approximate by design
    silu = convert_open(tiny_models(TinyModel(ffn_type=Q.Q4_1)), tmp_path)
    preds = [svd_predictor(silu, i, 32, 0.7) for i in range(silu.n_layer)]
    with pytest.raises(BudgetError, match="minimum is"):  # less than the predictors take
        Llama(str(silu.path), flash_offload=True, flash_dram_budget=1024,
              flash_predictors=preds, **KW)
    llm = Llama(str(silu.path), flash_offload=True, flash_dram_budget=0.7,
                flash_predictors=preds, **KW)
    assert llm("Hello", max_tokens=3)["usage"]["completion_tokens"] >= 1
    llm.close()


@pytest.mark.native
def test_the_stored_weight_only_predictor_runs_predicted_mode(tiny_models, tmp_path):
    # the converter's predictor is what predicted mode uses when none is passed in
    silu = convert_open(tiny_models(TinyModel(ffn_type=Q.Q4_1)), tmp_path)
    assert all(layer.predictor is not None for layer in silu.layers)
    llm = Llama(str(silu.path), flash_offload=True, flash_dram_budget=0.7,
                flash_mode="predicted", **KW)
    llm.flash_stats(reset=True)
    assert llm("Hello", max_tokens=4)["usage"]["completion_tokens"] >= 1
    stats = llm.flash_stats()
    assert 0 < stats["neurons_computed"] < stats["tokens"] * silu.n_layer * silu.n_ff
    assert stats["time_predict_s"] > 0
    llm.close()


@pytest.mark.native
def test_default_mode_is_the_one_expected_to_read_less(relu_model, tiny_models, tmp_path):
    silu = convert_open(tiny_models(TinyModel(ffn_type=Q.Q4_1)), tmp_path)
    spec = get_arch(silu.arch)

    def options_for(mode: str) -> FlashOptions:
        return flash_options(silu.payload_nbytes, 0.6, mode, max_tokens=1)

    hybrid = options_for("hybrid")
    plan = Runtime(silu, spec, hybrid, load=False).plan()
    rows = sum(silu.n_ff - slots for slots, _ in plan)
    assert expected_read_bytes(silu, spec, hybrid) == rows * silu.layers[0].layout.stride
    few, all_rows = [0.05] * silu.n_layer, [1.0] * silu.n_layer
    predicted = options_for("predicted")
    assert expected_read_bytes(silu, spec, predicted, densities=few) < \
        expected_read_bytes(silu, spec, hybrid) < \
        expected_read_bytes(silu, spec, predicted, densities=all_rows)
    # few rows active (ReLU-like): predicted; nearly all (a dense SiLU FFN): hybrid, whose
    # DRAM holds rows instead of predictors
    assert default_mode(silu, spec, options_for, densities=few) == "predicted"
    assert default_mode(silu, spec, options_for, densities=all_rows) == "hybrid"
    # what Llama does with the file's own densities
    llm = Llama(str(silu.path), flash_offload=True, flash_dram_budget=0.6, **KW)
    want = default_mode(silu, spec, options_for)
    assert llm.flash_runtime.mode == want
    llm.close()
    # nothing streams: the mode is moot; no predictor: hybrid, not an error
    assert default_mode(silu, spec, lambda m: flash_options(silu.payload_nbytes, 1.0, m)) \
        == "predicted"
    flash, _ = relu_model
    llm = Llama(str(flash.path), flash_offload=True, flash_dram_budget=0.5, **KW)
    assert llm.flash_runtime.mode == "hybrid"
    llm.close()


@pytest.mark.native
def test_predictor_recall_picks_thresholds_from_the_stored_curves(tiny_models, tmp_path):
    silu = convert_open(tiny_models(TinyModel(ffn_type=Q.Q4_1)), tmp_path)
    curves = [layer.predictor_curve for layer in silu.layers]
    assert all(c is not None for c in curves)
    computed = {}
    for recall in (0.5, 0.995):
        llm = Llama(str(silu.path), flash_offload=True, flash_dram_budget=0.9,
                    flash_pinned_share=0.0, flash_predictor_recall=recall, **KW)
        llm.flash_stats(reset=True)
        llm("Hello there", max_tokens=6)
        stats = llm.flash_stats()
        computed[recall] = stats["neurons_computed"] / stats["tokens"]
        llm.close()
    # a lower recall target: higher thresholds, fewer neurons computed
    assert computed[0.5] < 0.8 * computed[0.995]
    with pytest.raises(OptionError, match="outside the range the file's curves cover"):
        Llama(str(silu.path), flash_offload=True, flash_predictor_recall=0.2, **KW)
    with pytest.raises(OptionError, match="must be a number"):
        Llama(str(silu.path), flash_offload=True, flash_predictor_recall="high", **KW)
    with pytest.raises(OptionError, match="not both"):
        Llama(str(silu.path), flash_offload=True, flash_predictor_recall=0.9,
              flash_predictors=[layer.predictor for layer in silu.layers], **KW)


def test_predictor_recall_needs_curves(relu_model):
    flash, _ = relu_model
    with pytest.raises(OptionError, match="stores no threshold curves"):
        Llama(str(flash.path), flash_offload=True, flash_predictor_recall=0.9, **KW)
