"""The format fuzzer (tests/fuzz_flash.py) at the size CI affords: every mutated flash GGUF
loads and generates or raises a FlashGGUFError, in time, within its memory bound, and no
worker crashes. The longer run is `python tests/fuzz_flash.py --cases 10000`."""

from __future__ import annotations

import os

import pytest
from fuzz_flash import fuzz, make_seed_files, summarize

CI_SEED = 20261201


@pytest.mark.native
def test_mutated_flash_files_run_or_are_refused(tmp_path):
    # the sanitizer build is 2-3x slower: a share of the cases runs there
    cases = 300 if os.environ.get("FLASHGGUF_EXPECT_SANITIZED") else 1000
    results = fuzz(make_seed_files(tmp_path), list(range(cases)), CI_SEED, n_workers=2)
    summary = summarize(results)
    assert summary["cases"] == cases
    assert summary["findings"] == []
    # the mutations reach both sides: files that still run, and refusals
    assert summary["counts"].get("ran", 0) > cases // 10
    assert summary["counts"].get("refused", 0) > cases // 3
