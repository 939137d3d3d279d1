"""flashgguf-profile: every subcommand on a generated tiny model, its --json output checked
for the figures it must hold and for consistency (the trace's reads are the bytes read; a
replay at the recording's settings gives the recorded hits and bytes exactly)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flash_helpers import convert
from model_factory import TinyModel

from flashgguf.profile import main
from flashgguf.trace import Trace, TraceError

SPEC = TinyModel(n_layer=3, n_embd=128, n_ff=320, seed=5)


@pytest.fixture(scope="module")
def tiny_source(tiny_models) -> Path:
    return tiny_models(SPEC)


@pytest.fixture(scope="module")
def tiny_flash(tiny_source, tmp_path_factory) -> Path:
    return convert(tiny_source, tmp_path_factory.mktemp("profile") / "tiny.flash.gguf")


def profile_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json", "-q"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.native
@pytest.mark.parametrize("mode", ["hybrid", "predicted", "naive"])
def test_run_trace_and_exact_replay(capsys, tiny_flash, tmp_path, mode):
    trace_path = tmp_path / "run.npz"
    got = profile_json(capsys, "run", str(tiny_flash), "--budget", "0.5", "--mode", mode,
                       "--tokens", "6", "--threads", "1", "--trace", str(trace_path))
    assert got["mode"] == mode and got["tokens"] == 6 and len(got["per_token"]) == 6
    assert got["tok_s"] > 0 and got["bytes_read_total"] > 0
    for t in got["per_token"]:
        assert t["ms"] >= t["io_wait_ms"] + t["ffn_ms"] - 1e-6
        assert t["misses"] > 0 and t["read_mib"] > 0
    trace = Trace.load(trace_path)
    assert not trace.truncated
    # one call per layer per eval: the prompt's and each generated token's
    assert len(trace.calls) == 7 * SPEC.n_layer
    assert list(trace.calls["layer"][: SPEC.n_layer]) == list(range(SPEC.n_layer))
    # the trace's reads are the bytes read, call by call and in total
    assert int(trace.read_len.sum()) == got["bytes_read_total"] == got["trace"]["bytes_read"]
    assert int(trace.calls["bytes_read"].sum()) == got["bytes_read_total"]
    ends = trace.calls["first_read"] + trace.calls["reads"]
    assert list(trace.calls["first_read"][1:]) == list(ends[:-1])
    for i, call in enumerate(trace.calls):
        reads = slice(int(call["first_read"]), int(ends[i]))
        assert int(trace.read_len[reads].sum()) == int(call["bytes_read"])
        assert trace.mask(i).sum() == call["needed"]
        assert call["needed"] == call["pinned"] + call["hits"] + call["misses"]

    rep = profile_json(capsys, "replay", str(trace_path))
    assert rep["same_plan"]
    for key in ("calls", "hits", "misses", "pinned", "reads", "bytes_read"):
        assert rep["replayed"][key] == rep["recorded"][key], key


@pytest.mark.native
def test_replay_other_settings_and_shape(capsys, tiny_flash, tmp_path):
    trace_path = tmp_path / "run.npz"
    profile_json(capsys, "run", str(tiny_flash), "--budget", "0.3", "--mode", "hybrid",
                 "--tokens", "4", "--threads", "1", "--trace", str(trace_path))
    more = profile_json(capsys, "replay", str(trace_path), "--budget", "0.9", "--io", "threads",
                        "--gap", "0")
    assert not more["same_plan"]
    assert more["replayed"]["bytes_read"] < more["recorded"]["bytes_read"]
    assert more["options"]["coalesce_gap"] == 0

    work = tmp_path / "work"
    work.mkdir()
    shaped = profile_json(capsys, "replay", str(trace_path), "--shape", "5,256,640",
                          "--workdir", str(work), "--disk-mb-s", "500")
    assert shaped["shape"] == {"n_layer": 5, "n_embd": 256, "n_ff": 640,
                               "payload": shaped["shape"]["payload"]}
    assert shaped["replayed"]["calls"] == 5 * 5  # prompt + 4 tokens, 5 layers each
    # hybrid needs every row; at the recording's budget share the rest is read
    assert shaped["replayed"]["misses"] > 0
    assert shaped["implied"]["bandwidth_mb_s"] == 500
    assert list(work.iterdir()) == []  # the shaped payload is scratch


def test_trace_files_are_checked(tmp_path, capsys):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(TraceError, match="cannot read a trace"):
        Trace.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, meta=np.array("{}"))
    with pytest.raises(TraceError, match="not a flashgguf trace"):
        Trace.load(other)
    assert main(["replay", str(junk), "-q"]) == 2
    assert "cannot read a trace" in capsys.readouterr().err


def test_run_converts_a_plain_gguf_in_scratch(capsys, tiny_source, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    got = profile_json(capsys, "run", str(tiny_source), "--budget", "0.5", "--mode", "hybrid",
                       "--tokens", "2", "--workdir", str(work))
    assert got["mode"] == "hybrid" and len(got["per_token"]) == 2
    assert list(work.iterdir()) == []


def test_bad_options_exit_2_naming_them(capsys, tiny_flash, tiny_source, tmp_path):
    assert main(["run", str(tiny_flash), "--tokens", "0", "-q"]) == 2
    assert "--tokens" in capsys.readouterr().err
    assert main(["bench", str(tiny_source), "--stock", "fast", "-q"]) == 2
    assert "'fast' is not shipped or mmap" in capsys.readouterr().err
    trace_path = tmp_path / "t.npz"
    profile_json(capsys, "run", str(tiny_flash), "--budget", "0.5", "--mode", "hybrid",
                 "--tokens", "1", "--trace", str(trace_path))
    assert main(["replay", str(trace_path), "--shape", "1,2", "-q"]) == 2
    assert "--shape '1,2'" in capsys.readouterr().err
    assert main(["run", str(tiny_flash), "--budget", "1.0", "--trace", str(trace_path),
                 "-q"]) == 2
    assert "nothing streams" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", str(tmp_path / "missing.gguf")])


def test_quality_against_stock(capsys, tiny_source, tiny_flash):
    got = profile_json(capsys, "quality", str(tiny_source), str(tiny_flash), "--tokens", "48",
                       "--run", "mode=hybrid,dram_budget=0.5", "--threads", "1")
    assert got["tokens"] == 48 and got["stock_perplexity"] > 1
    (run,) = got["runs"]
    assert run["mode"] == "hybrid" and run["setting"]["mode"] == "hybrid"
    # hybrid computes every neuron: stock's quality up to kernel rounding
    assert run["computed"] == pytest.approx(1.0)
    assert abs(run["ratio"] - 1) < 0.02 and run["top1"] > 0.9
    assert run["read_mib_per_token"] > 0


def test_io_device_curve_and_engines(capsys, tiny_flash, tmp_path):
    got = profile_json(capsys, "io", "--path", str(tmp_path), "--file-mb", "2", "--mb", "1",
                       "--sizes", "4K,64K", "--depths", "1,2", "--flash", str(tiny_flash),
                       "--tokens", "2", "--gaps", "0,auto", "--engines", "threads,io_uring")
    points = got["device"]["points"]
    assert len(points) == 2 * 2 * 2
    assert all(p.get("mb_s", 1) > 0 for p in points)
    engines = got["engines"]
    assert len(engines) == 2 * 2 * 2
    # the same random rows: the same bytes whatever the engine, fewer reads with coalescing
    for depth in (1, 2):
        by = {(e["engine"], e["gap"]): e for e in engines if e["depth"] == depth}
        assert by[("threads", 0)]["mib_per_token"] == by[("io_uring", 0)]["mib_per_token"]
        assert by[("threads", "auto")]["reads_per_token"] <= by[("threads", 0)]["reads_per_token"]
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone


@pytest.mark.skipif(bool(os.environ.get("FLASHGGUF_EXPECT_SANITIZED")),
                    reason="AddressSanitizer's shadow memory and quarantine outgrow a cap sized "
                    "from the measured overhead (the children are killed under it)")
def test_bench_under_a_cap(capsys, tiny_source, tiny_flash):
    got = profile_json(capsys, "bench", str(tiny_source), "--flash", str(tiny_flash),
                       "--caps", "0.9", "--tokens", "3", "--stock", "mmap", "--modes", "hybrid",
                       "--threads", "1")
    names = {m["name"]: m for m in got["medians"]}
    assert set(names) == {"stock mmap", "flash hybrid"}
    for m in names.values():
        assert m["tok_s"] > 0, m
    assert names["flash hybrid"]["read_mib_per_token"] >= 0
    assert got["overhead_mb"] > 0 and isinstance(got["capped"], bool)
    assert all(r["text"] for r in got["runs"])


def test_plots_and_their_absence(capsys, tiny_flash, tiny_source, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    png = tmp_path / "timeline.png"
    got = profile_json(capsys, "run", str(tiny_flash), "--budget", "0.5", "--mode", "hybrid",
                       "--tokens", "3", "--plot", str(png))
    assert got["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = tmp_path / "quality.png"
    got = profile_json(capsys, "quality", str(tiny_source), str(tiny_flash), "--tokens", "24",
                       "--run", "mode=hybrid", "--run", "mode=naive", "--plot", str(png),
                       "--stock-floor")
    assert png.read_bytes()[:4] == b"\x89PNG" and len(got["runs"]) == 2
    assert 0.5 < got["stock_floor"]["top1"] <= 1
    # without matplotlib: the table (here the JSON) and a hint, no failure
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    capsys.readouterr()
    assert main(["run", str(tiny_flash), "--budget", "0.5", "--mode", "hybrid", "--tokens", "1",
                 "--plot", str(tmp_path / "none.png"), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["plot"] is None and "flashgguf[plot]" in out.err
    assert not (tmp_path / "none.png").exists()


def test_bench_uncapped_with_a_mode_budget(capsys, tiny_source, tiny_flash, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    got = profile_json(capsys, "bench", str(tiny_source), "--flash", str(tiny_flash),
                       "--caps", "none", "--budget", "0.5", "--tokens", "2", "--stock", "",
                       "--modes", "hybrid,predicted:dram_budget=1.0", "--threads", "1",
                       "--plot", str(png))
    assert not got["capped"]
    modes = {r["name"]: r["mode"] for r in got["runs"]}
    # the mode's own budget wins: the whole payload fits, so it stays resident
    assert modes == {"flash hybrid": "hybrid", "flash predicted:dram_budget=1.0": "dense"}
    assert png.read_bytes()[:4] == b"\x89PNG"


def _profile_children(marker: str) -> list[int]:
    """Pids of flashgguf.profile.child processes whose spec names marker."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"flashgguf.profile.child" in cmd and marker.encode() in cmd:
            pids.append(int(entry.name))
    return pids


def test_sigterm_leaves_no_child_cgroup_or_scratch(tiny_source, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashgguf.profile", "bench", str(tiny_source), "--caps", "0.9",
         "--tokens", "100000", "--stock", "mmap", "--modes", "", "--workdir", str(work),
         "--timeout", "600", "-q"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _profile_children(str(work)) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        assert _profile_children(str(work)), "no measured child started"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "interrupted" in proc.stderr.read()
    assert _profile_children(str(work)) == []
    assert list(work.iterdir()) == []  # the scratch conversion is gone
    groups = [p for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory"))
              if root.is_dir() for p in root.glob(f"flashgguf-profile-{proc.pid}-*")]
    assert groups == []
