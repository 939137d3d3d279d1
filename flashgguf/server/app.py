"""flashgguf-server's app: llama_cpp.server's FastAPI app, with its models made by flashgguf.

Nothing of llama_cpp.server is copied. Its create_app runs as it is; for that one call the
names it builds models and settings from are flashgguf's subclasses, and its model loader
runs with flashgguf.Llama (plus the model's flash_* settings) where it calls
llama_cpp.Llama. Routes, streaming, locking and the chat templates are llama_cpp.server's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import llama_cpp
import llama_cpp.server.app as server_app
import llama_cpp.server.model as server_model
from fastapi import APIRouter, Depends, FastAPI
from llama_cpp.server.errors import RouteErrorHandler
from llama_cpp.server.model import LlamaProxy
from llama_cpp.server.settings import ModelSettings, ServerSettings

from ..llama import Llama
from ..runtime import swapped_attribute
from .settings import (
    FlashConfigFileSettings,
    FlashModelSettings,
    FlashSettings,
    llama_flash_kwargs,
)

STATS_PATH = "/extras/flash/stats"


class _LlamaCppWithFlash:
    """llama_cpp as llama_cpp.server's model loader sees it: Llama is a flashgguf.Llama."""

    def __init__(self, llama_class: type[Llama]) -> None:
        self.Llama = llama_class

    def __getattr__(self, name: str) -> Any:
        return getattr(llama_cpp, name)


def _served_llama_class(flash_kwargs: dict[str, Any]) -> type[Llama]:
    class ServedLlama(Llama):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **flash_kwargs, **kwargs)

    return ServedLlama


class FlashLlamaProxy(LlamaProxy):
    """llama_cpp.server's model proxy whose models are flashgguf.Llama objects."""

    @staticmethod
    def load_llama_from_model_settings(settings: ModelSettings) -> llama_cpp.Llama:
        served = _served_llama_class(llama_flash_kwargs(settings))
        with swapped_attribute(server_model, "llama_cpp", _LlamaCppWithFlash(served)):
            return LlamaProxy.load_llama_from_model_settings(settings)


@contextlib.contextmanager
def _flash_names() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for name, value in (("LlamaProxy", FlashLlamaProxy), ("Settings", FlashSettings),
                            ("ModelSettings", FlashModelSettings),
                            ("ConfigFileSettings", FlashConfigFileSettings)):
            stack.enter_context(swapped_attribute(server_app, name, value))
        yield


flash_router = APIRouter(route_class=RouteErrorHandler)


@flash_router.get(STATS_PATH, summary="Flash runtime statistics", tags=["Extras"],
                  dependencies=[Depends(server_app.authenticate)])
async def get_flash_stats(
    llama_proxy: Annotated[LlamaProxy, Depends(server_app.get_llama_proxy)],
    model: str | None = None,
) -> dict[str, Any]:
    """flashgguf.Llama.flash_stats() of a model (the default one unless named): cumulative
    counters since it was loaded; "flash" is false and "stats" empty for a plain GGUF."""
    llama = llama_proxy(model)
    runtime = getattr(llama, "flash_runtime", None)
    return {
        "object": "flash.stats",
        "model": llama.model_path,
        "flash": runtime is not None,
        "mode": None if runtime is None else runtime.mode,
        "stats": {} if runtime is None else llama.flash_stats(),
    }


def create_flash_app(server_settings: ServerSettings | None = None,
                     model_settings: Sequence[ModelSettings] | None = None) -> FastAPI:
    """llama_cpp.server.app.create_app with flashgguf's models, plus the stats route. Like
    create_app, it loads the default model before returning (errors surface here, before
    any port is bound) and reads CONFIG_FILE when set (its models may set flash_* options)."""
    with _flash_names():
        app = server_app.create_app(
            server_settings=server_settings,
            model_settings=None if model_settings is None else list(model_settings))
    app.include_router(flash_router)
    return app


def current_server_settings() -> ServerSettings:
    """The settings the last create_flash_app call serves with (from a config file too)."""
    settings = next(server_app.get_server_settings())
    assert settings is not None, "create_flash_app has not been called"
    return settings
