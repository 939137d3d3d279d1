"""flashgguf-server: llama-cpp-python's OpenAI-compatible server, serving flash GGUFs.

    pip install 'flashgguf[server]'
    flashgguf-server --model smollm2.flash.gguf --flash-dram-budget 32MiB --port 8000

Every option of `python -m llama_cpp.server` works as it does there, plus the flash_*
options of flashgguf.Llama (also in a --config_file's model entries, or from the
environment, e.g. FLASH_DRAM_BUDGET). A plain GGUF is served by stock llama.cpp; a flash
GGUF with flash offload. GET /extras/flash/stats returns the model's flash_stats().
The model is loaded before the port is bound: a bad option or file ends the process with
a message and exit status 1, never a half-started server.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import VersionMismatchError

_EXTRA_HINT = "pip install 'flashgguf[server]'"


def _underscored(argv: Sequence[str]) -> list[str]:
    """--flash-dram-budget as well as llama_cpp.server's own --flash_dram_budget spelling."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            arg = name.replace("-", "_").replace("__", "--", 1) + eq + value
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        import uvicorn
        from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
        from llama_cpp.server.settings import ServerSettings

        from .app import create_flash_app, current_server_settings
        from .settings import FlashModelSettings, FlashSettings
    except VersionMismatchError as e:
        print(f"flashgguf-server: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"flashgguf-server needs llama-cpp-python's server packages ({e.name} is "
              f"missing): {_EXTRA_HINT}", file=sys.stderr)
        return 1

    parser = argparse.ArgumentParser(
        prog="flashgguf-server",
        description="llama-cpp-python's OpenAI-compatible server with flash offload.")
    add_args_from_model(parser, FlashSettings)
    parser.add_argument("--config_file", type=str,
                        help="A llama_cpp.server config file (JSON or YAML) whose models may "
                        "set flash_* options; replaces the model options above.")
    args = parser.parse_args(_underscored(sys.argv[1:] if argv is None else argv))
    config_file = args.config_file or os.environ.get("CONFIG_FILE")
    if not config_file and args.model is None:
        parser.error("give --model (or a --config_file)")
    try:
        if config_file:
            if not os.path.isfile(config_file):
                raise FileNotFoundError(f"config file {config_file} not found")
            os.environ["CONFIG_FILE"] = config_file  # create_app reads it from there
            app = create_flash_app()
        else:
            app = create_flash_app(parse_model_from_args(ServerSettings, args),
                                   [parse_model_from_args(FlashModelSettings, args)])
        settings = current_server_settings()
        config = uvicorn.Config(app, host=settings.host, port=settings.port,
                                ssl_keyfile=settings.ssl_keyfile,
                                ssl_certfile=settings.ssl_certfile)
        try:
            sock = config.bind_socket()
        except SystemExit:  # uvicorn has logged why (address in use, no permission)
            raise OSError(f"cannot listen on {settings.host}:{settings.port}") from None
        # listening now, not once uvicorn's loop has started: a client that connects as
        # soon as the address is printed waits in the backlog instead of being refused
        sock.listen(config.backlog)
    except Exception as e:  # a start-up failure of any kind is reported, never half-served
        print(f"flashgguf-server: cannot start: {e}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    scheme = "https" if settings.ssl_certfile else "http"
    print(f"flashgguf-server: serving on {scheme}://{host}:{port}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
