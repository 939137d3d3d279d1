"""One measured run in its own interpreter (so that a memory cap, a crash or an OOM kill
touches this run only): `python -m flashgguf.profile.child SPEC_JSON` prints one JSON line.

spec: kind ("stock shipped", "stock mmap" or "flash"), model or flash (paths), threads,
tokens (greedy decode tokens timed after a short prompt); flash also options (flashgguf.Llama
keyword arguments) and no_repack (llama.cpp's weight repacking off, as stock mmap)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

from ..runtime import no_weight_repacking
from .harness import (
    MB,
    PROMPT,
    greedy_next_token,
    per_token,
    proc_read_bytes,
    rss_anon,
)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    kind = spec["kind"]
    kw = dict(n_ctx=256, n_batch=64, n_ubatch=64, n_threads=spec["threads"],
              n_threads_batch=spec["threads"], verbose=False)
    repack_off = kind == "stock mmap" or (kind == "flash" and spec.get("no_repack"))
    t0 = time.perf_counter()
    with no_weight_repacking() if repack_off else contextlib.nullcontext():
        if kind.startswith("stock"):
            import llama_cpp

            llm = llama_cpp.Llama(spec["model"], use_mmap=True, **kw)
        else:
            from flashgguf import Llama

            llm = Llama(spec["flash"], flash_offload=True, **spec.get("options", {}), **kw)
    load_s = time.perf_counter() - t0
    llm.eval(llm.tokenize(PROMPT.encode()))
    tok = greedy_next_token(llm)
    runtime = getattr(llm, "flash_runtime", None)
    if runtime is not None:
        llm.flash_stats(reset=True)
    read0 = proc_read_bytes()
    t0 = time.perf_counter()
    generated = []
    for _ in range(spec["tokens"]):
        llm.eval([tok])
        generated.append(tok)
        tok = greedy_next_token(llm)
    dt = time.perf_counter() - t0
    out: dict[str, Any] = dict(
        load_s=load_s, text=llm.detokenize(generated).decode(errors="replace"),
        tok_s=spec["tokens"] / dt, s_per_token=dt / spec["tokens"],
        device_mb_per_token=(proc_read_bytes() - read0) / MB / spec["tokens"],
        rss_anon_mb=rss_anon() / MB)
    if runtime is not None:
        out["mode"] = runtime.mode
        n_ff = getattr(runtime.flash, "n_ff", 0)  # MoE files: experts, not neurons
        out.update(per_token(llm.flash_stats(), runtime.flash.n_layer * n_ff))
    llm.close()
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(json.dumps(measure(json.loads(args[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
