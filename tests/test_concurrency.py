"""Threads, close() and fork() around a model: refused or serialized, never a crash or a
corrupted generation (flashgguf/usage.py)."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from flash_helpers import convert
from model_factory import TinyModel

from flashgguf import Llama
from flashgguf.errors import ConcurrentUseError, ModelClosedError

pytestmark = pytest.mark.native

KW = dict(n_ctx=256, n_batch=64, verbose=False, n_threads=1, n_threads_batch=1,
          flash_offload=True, flash_dram_budget=0.5, flash_mode="hybrid")
PROMPT = "Hello there"
N = 12


@pytest.fixture(scope="module")
def flash_paths(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("concurrency")
    return [convert(tiny_models(TinyModel(seed=s)), folder / f"m{s}.flash.gguf")
            for s in (1, 2)]


def _text(llm: Llama, **kw) -> str:
    return llm(PROMPT, max_tokens=N, temperature=0.0, **kw)["choices"][0]["text"]


def _alone(path) -> str:
    llm = Llama(str(path), **KW)
    try:
        return _text(llm)
    finally:
        llm.close()


def _blocking_processor(entered: threading.Event, release: threading.Event):
    """A logits processor that holds its generation inside a step until released."""
    def hold(_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        entered.set()
        release.wait(30)
        return logits
    return [hold]


def test_two_models_generate_at_once_in_two_threads(flash_paths):
    want = [_alone(p) for p in flash_paths]
    models = [Llama(str(p), **KW) for p in flash_paths]
    got: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, _text(models[i])))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for m in models:
        m.close()
    assert [got.get(0), got.get(1)] == want


def test_a_second_thread_is_refused_while_a_step_runs(flash_paths):
    llm = Llama(str(flash_paths[0]), **KW)
    want = _text(llm)
    entered, release = threading.Event(), threading.Event()
    result: dict[str, object] = {}

    def first() -> None:
        result["a"] = _text(llm, logits_processor=_blocking_processor(entered, release))

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert entered.wait(30)
        for call in (lambda: _text(llm), lambda: llm.eval([1, 2]), llm.reset,
                     lambda: llm.create_chat_completion([{"role": "user", "content": "Hi"}])):
            with pytest.raises(ConcurrentUseError, match="another thread"):
                call()
    finally:
        release.set()
        thread.join(60)
    assert result["a"] == want  # the refused calls changed nothing
    assert _text(llm) == want
    llm.close()


def test_a_new_call_between_steps_ends_the_interrupted_stream(flash_paths):
    llm = Llama(str(flash_paths[0]), **KW)
    want = _text(llm)
    stream = llm(PROMPT, max_tokens=N, temperature=0.0, stream=True)
    next(stream)
    # another thread takes the model between two chunks, as llama-cpp-python allows
    other: dict[str, str] = {}
    thread = threading.Thread(target=lambda: other.__setitem__("text", _text(llm)))
    thread.start()
    thread.join(60)
    assert other["text"] == want
    with pytest.raises(ConcurrentUseError, match="interrupted"):
        list(stream)
    assert _text(llm) == want
    llm.close()


def test_close_while_another_thread_generates(flash_paths):
    llm = Llama(str(flash_paths[0]), **KW)
    entered, release = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def generate() -> None:
        try:
            chunks = llm(PROMPT, max_tokens=N, temperature=0.0, stream=True,
                         logits_processor=_blocking_processor(entered, release))
            outcome["chunks"] = [c["choices"][0]["text"] for c in chunks]
        except ModelClosedError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=generate)
    thread.start()
    assert entered.wait(30)
    llm.close()  # returns at once: the step in progress is not freed under it
    assert llm.flash_runtime is not None
    release.set()
    thread.join(60)
    assert isinstance(outcome.get("error"), ModelClosedError)
    assert llm.flash_runtime is None  # freed when that step ended
    with pytest.raises(ModelClosedError):
        _text(llm)
    llm.close()


_EXIT_AND_FORK = """
import os, sys
from flashgguf import Llama
from flashgguf.errors import ModelClosedError
kw = dict(n_ctx=256, verbose=False, n_threads=1, flash_offload=True, flash_dram_budget=0.5,
          flash_mode="hybrid")
llm = Llama(sys.argv[1], **kw)
want = llm("Hello", max_tokens=4, temperature=0.0)["choices"][0]["text"]
pid = os.fork()
if pid == 0:
    try:
        llm("Hello", max_tokens=4)
        code = 3
    except ModelClosedError as exc:
        code = 0 if "forked" in str(exc) else 4
    llm.close()  # frees nothing in the child: the parent owns the threads
    sys.exit(code)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert llm("Hello", max_tokens=4, temperature=0.0)["choices"][0]["text"] == want
unclosed = Llama(sys.argv[1], **kw)  # left open at exit, like the first
unclosed("Hello", max_tokens=2)
print("ok")
"""


def test_fork_after_load_and_exit_with_models_open(flash_paths):
    done = subprocess.run([sys.executable, "-c", _EXIT_AND_FORK, str(flash_paths[0])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
