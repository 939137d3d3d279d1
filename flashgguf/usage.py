"""One model, one caller at a time, and close() that never frees what is in use.

llama.cpp's context and flashgguf's runtime are not safe to use from two threads at once,
and freeing them under a running decode or sampler crashes the process. A UseGuard lets one
step run at a time: a call (decode, embedding, state) or one step of a generation, which may
be resumed from different threads (llama_cpp.server does). A call from another thread while
a step runs gets ConcurrentUseError; calls nested in the running step (the decodes a
generation makes) pass. A new use between two steps of a generation takes the model over,
as llama-cpp-python's own calls do (they reset its state): the generation it interrupted
then ends with ConcurrentUseError at its next step instead of going on from the other
call's state. close() during a step is deferred until the step ends; a generation resumed
after close() ends with ModelClosedError. In a child made by fork() the model is unusable
(its read threads were not copied) and close() frees nothing there: the parent owns it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from .errors import ConcurrentUseError, ModelClosedError

T = TypeVar("T")


class UseGuard:
    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._owner: object | None = None  # the last use that started
        self._thread: int | None = None  # the thread running a step now
        self._depth = 0
        self._closing = False
        self._pending_close: Callable[[], None] | None = None
        self._pid = os.getpid()

    def _enter(self, what: str, span: object, resume: bool) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._closing:
                raise ModelClosedError(f"{self._name} was closed")
            if os.getpid() != self._pid:
                raise ModelClosedError(
                    f"{self._name} was loaded before this process was forked; its read "
                    "threads stayed in the parent: load the model again in this process")
            if self._thread == me:  # nested in the step running on this thread
                self._depth += 1
                return
            if self._thread is not None:
                raise ConcurrentUseError(
                    f"{self._name} is running a call in another thread ({what} refused): "
                    "use one model per thread, or a lock around its calls")
            if resume and self._owner is not span:
                raise ConcurrentUseError(
                    f"{self._name}: this generation was interrupted by another call on the "
                    "model, which reset its state")
            self._owner, self._thread, self._depth = span, me, 1

    def _leave(self) -> None:
        pending = None
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._thread = None
                pending, self._pending_close = self._pending_close, None
        if pending is not None:
            pending()

    @contextlib.contextmanager
    def use(self, what: str) -> Iterator[None]:
        """One call, start to end."""
        self._enter(what, object(), resume=False)
        try:
            yield
        finally:
            self._leave()

    def generation(self, what: str, steps: Iterator[T]) -> Iterator[T]:
        """steps (a generator) run one step at a time under the guard; the consumer's time
        between steps is not a use."""
        span = object()
        resume = False
        try:
            while True:
                self._enter(what, span, resume)
                resume = True
                try:
                    item = next(steps)
                except StopIteration:
                    return
                finally:
                    self._leave()
                yield item
        finally:
            close = getattr(steps, "close", None)
            if close is not None:
                close()

    def close(self, free: Callable[[], None]) -> None:
        """free() now, or when the running step ends; later uses raise ModelClosedError."""
        with self._lock:
            self._closing = True
            if os.getpid() != self._pid:
                return  # a forked child: the parent's threads and memory are not its to free
            if self._thread is not None:
                self._pending_close = free
                return
        free()
