"""flashgguf-server: llama-cpp-python's OpenAI-compatible server on flash GGUFs, started in
a child process on an ephemeral port and driven with the openai client."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flash_helpers import convert

from flashgguf import Llama

openai = pytest.importorskip("openai", reason="pip install 'flashgguf[test]'")
pytestmark = pytest.mark.native

# the same settings in the server and in-process, 1 thread each: the FFN's partial sums
# (and llama.cpp's) are added in an order that depends on the thread count
LLAMA_KW = dict(n_ctx=256, n_batch=64, n_threads=1, n_threads_batch=1)
FLASH_KW = dict(flash_mode="hybrid", flash_dram_budget=0.5)
# llama_cpp.server's requests default to repeat_penalty 1.1, llama_cpp.Llama's calls to 1.0
SAMPLING = dict(temperature=0.0, repeat_penalty=1.0)
PROMPT = "The old man looked at the sea and"
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
START_TIMEOUT = 120.0


@dataclass
class Server:
    url: str
    process: subprocess.Popen

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0,
                             timeout=120.0)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=120) as response:
            return json.load(response)


def _command_line(model: Path, **options) -> list[str]:
    args = [sys.executable, "-m", "flashgguf.server", "--model", str(model),
            "--host", "127.0.0.1", "--port", "0", "--verbose", "false"]
    for name, value in options.items():
        args += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def served(model: Path, **options) -> contextlib.AbstractContextManager[Server]:
    return served_command(_command_line(model, **options))


@contextlib.contextmanager
def served_command(command: list[str]) -> Iterator[Server]:
    """A flashgguf-server child process, stopped at the end whatever happens."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        line = ""
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line or "serving on" in line:
                break
        match = re.search(r"serving on (http://\S+)", line)
        if match is None:
            _stop(process)
            pytest.fail(f"the server did not start:\n{process.stderr.read()}")
        yield Server(match.group(1), process)
    finally:
        _stop(process)
        for stream in (process.stdout, process.stderr):
            stream.close()


def _refused(model: Path, **options) -> str:
    """Start the server expecting it to refuse: its stderr (the test fails if it serves)."""
    done = subprocess.run(_command_line(model, **options), capture_output=True, text=True,
                          timeout=START_TIMEOUT)
    assert done.returncode != 0 and "serving on" not in done.stdout, done.stdout
    return done.stderr


def _in_process(model: Path, **flash) -> Llama:
    return Llama(str(model), verbose=False, **LLAMA_KW, **flash)


def _completion(llm: Llama, max_tokens: int = 16) -> str:
    return llm(PROMPT, max_tokens=max_tokens, **SAMPLING)["choices"][0]["text"]


def _chat(llm: Llama, max_tokens: int = 16) -> str:
    chat = llm.create_chat_completion(MESSAGES, max_tokens=max_tokens, **SAMPLING)
    return chat["choices"][0]["message"]["content"]


def _served_completion(server: Server, max_tokens: int = 16) -> str:
    done = server.client().completions.create(
        model="m", prompt=PROMPT, max_tokens=max_tokens, temperature=0.0,
        extra_body={"repeat_penalty": 1.0})
    return done.choices[0].text


def _served_streamed_chat(server: Server, max_tokens: int = 16) -> str:
    stream = server.client().chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=max_tokens, temperature=0.0, stream=True,
        extra_body={"repeat_penalty": 1.0})
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


@pytest.fixture(scope="module")
def tiny_flash(tiny_models, tmp_path_factory) -> Path:
    return convert(tiny_models(), tmp_path_factory.mktemp("served") / "tiny.flash.gguf")


@pytest.fixture(scope="module")
def tiny_server(tiny_flash) -> Iterator[Server]:
    with served(tiny_flash, **LLAMA_KW, **FLASH_KW) as server:
        yield server


def test_completion_and_streamed_chat_equal_in_process(tiny_flash, tiny_server):
    llm = _in_process(tiny_flash, flash_offload=True, **FLASH_KW)
    try:
        want_text, want_chat = _completion(llm), _chat(llm)
    finally:
        llm.close()
    assert want_text and want_chat
    assert _served_completion(tiny_server) == want_text
    assert _served_streamed_chat(tiny_server) == want_chat


def test_models_and_stats_grow(tiny_flash, tiny_server):
    models = tiny_server.client().models.list()
    assert [m.id for m in models.data] == [str(tiny_flash)]
    before = tiny_server.get("/extras/flash/stats")
    assert before["flash"] and before["mode"] == "hybrid"
    _served_completion(tiny_server, max_tokens=8)
    after = tiny_server.get("/extras/flash/stats")
    assert after["stats"]["tokens"] >= before["stats"]["tokens"] + 8
    assert after["stats"]["bytes_read"] > before["stats"]["bytes_read"]


def _read_some_then_disconnect(server: Server) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0.0, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the stream has begun
    conn.close()  # the client goes away mid-stream


def test_disconnect_mid_stream_leaves_the_model_usable(tiny_flash, tiny_server):
    llm = _in_process(tiny_flash, flash_offload=True, **FLASH_KW)
    try:
        want = _completion(llm)
    finally:
        llm.close()
    for _ in range(2):
        _read_some_then_disconnect(tiny_server)
        assert _served_completion(tiny_server) == want
    assert tiny_server.process.poll() is None


def test_plain_gguf_is_served_by_stock_llama_cpp(tiny_models):
    source = tiny_models()
    import llama_cpp

    stock = llama_cpp.Llama(str(source), verbose=False, **LLAMA_KW)
    try:
        want = _completion(stock)
    finally:
        stock.close()
    with served(source, **LLAMA_KW) as server:
        assert _served_completion(server) == want
        stats = server.get("/extras/flash/stats")
        assert stats["flash"] is False and stats["stats"] == {}


def test_config_file_sets_flash_options(tiny_flash, tmp_path):
    config = {"host": "127.0.0.1", "port": 0, "models": [
        {"model": str(tiny_flash), "model_alias": "tiny", "flash_mode": "naive",
         "flash_dram_budget": "0.25", "verbose": False, **LLAMA_KW}]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with served_command([sys.executable, "-m", "flashgguf.server", "--config_file",
                         str(path)]) as server:
        assert [m.id for m in server.client().models.list().data] == ["tiny"]
        assert server.get("/extras/flash/stats")["mode"] == "naive"


@pytest.mark.parametrize("options, message", [
    (dict(flash_mode="smart"), "flash_mode"),
    (dict(flash_dram_budget="lots"), "flash_dram_budget"),
    (dict(flash_gate_keep=1.5), "flash_gate_keep"),
    (dict(flash_coalesce_gap="big"), "flash_coalesce_gap"),
    (dict(flash_window="x"), "flash_window"),
])
def test_bad_options_are_refused_at_start_up(tiny_flash, options, message):
    assert message in _refused(tiny_flash, **LLAMA_KW, **options)


def test_bad_files_are_refused_at_start_up(tiny_models, tmp_path):
    missing = tmp_path / "missing.gguf"
    assert "missing.gguf" in _refused(missing)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    assert "junk.gguf" in _refused(junk)
    assert "not a flash GGUF" in _refused(tiny_models(), flash_offload=True)


def test_missing_config_file_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "flashgguf.server", "--config_file",
                           str(tmp_path / "none.json")], capture_output=True, text=True,
                          timeout=START_TIMEOUT)
    assert done.returncode == 1 and "none.json" in done.stderr


@pytest.mark.model
def test_smollm2_served_like_in_process(smollm2_flash):
    # the whole payload resident: a streaming budget computes each miss as its read lands,
    # so the order of the FFN's sums (and a near-tie between two tokens) varies run to run
    # (README); the tiny model's layers are one read each, so the tests above stream
    options = dict(flash_dram_budget=1.0)
    llm = _in_process(smollm2_flash, flash_offload=True, **options)
    try:
        want_text, want_chat = _completion(llm, 24), _chat(llm, 24)
    finally:
        llm.close()
    with served(smollm2_flash, **LLAMA_KW, **options) as server:
        assert _served_completion(server, 24) == want_text
        assert _served_streamed_chat(server, 24) == want_chat
        stats = server.get("/extras/flash/stats")
        assert stats["mode"] == "dense" and stats["stats"]["tokens"] >= 48  # all resident


def test_hyphenated_options_are_read(tiny_flash):
    """--flash-mode as well as llama_cpp.server's own --flash_mode spelling."""
    command = _command_line(tiny_flash, n_ctx=256) + [
        "--flash-mode", "naive", "--flash-dram-budget=0.5", "--n-threads", "1"]
    with served_command(command) as server:
        assert server.get("/extras/flash/stats")["mode"] == "naive"


def test_missing_server_packages_name_the_extra(tiny_flash):
    # fastapi made unimportable, as on an install without flashgguf[server]
    code = ("import sys; sys.modules['fastapi'] = None; from flashgguf.server import main; "
            f"sys.exit(main(['--model', {str(tiny_flash)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=START_TIMEOUT)
    assert done.returncode == 1
    assert "fastapi" in done.stderr and "flashgguf[server]" in done.stderr
