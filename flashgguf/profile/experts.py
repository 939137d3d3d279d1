"""flashgguf-profile experts: how a mixture of experts routes, and what an expert cache of
each size would hit. One greedy generation records every MoE layer call's experts (the
runtime's routing record); the record then goes through the runtime's own eviction policy
(CLOCK with use counts, simulated exactly: at the run's slot count it gives the hits the
runtime counted), LRU, and Belady's optimum (the bound no policy filling an empty cache on
demand beats), for a range of cache sizes; for files converted with --calibrate also CLOCK
with the most used experts pinned, as the runtime pins them (read at load: where they cover
a decode's first uses it can pass that optimum). Also per layer: how skewed the routing is
(the share of the top-k choices the most used tenth of the experts takes; 0.1 under uniform
routing)."""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..expert_cache import clock_hits, pinned_experts, top_tenth_share
from ..options import DEFAULT_PINNED_SHARE
from .harness import (
    PROMPT,
    MiB,
    ProfileError,
    emit,
    evaluation_text,
    existing_file,
    float_list,
    fmt,
    greedy_next_token,
    load_average,
    note,
    print_table,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("experts", help="a mixture of experts' routing and its cache curve",
                       description=__doc__)
    p.add_argument("model", type=existing_file, help="a mixture-of-experts flash GGUF")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens recorded")
    p.add_argument("--teacher-forced", action="store_true",
                   help="decode the evaluation text (--text, else the project's) token by "
                   "token instead of the model's greedy continuation: natural text's routing "
                   "where the model's own output is not natural (random weights)")
    p.add_argument("--text", type=Path, default=None,
                   help="with --teacher-forced: the text (default: the evaluation text)")
    p.add_argument("--budget", default="0.25",
                   help="the run's expert cache (a share of the experts' bytes, or a size)")
    p.add_argument("--shares", type=float_list,
                   default=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                   help="cache sizes simulated, as shares of all experts")
    p.add_argument("--pinned-share", type=float, default=None,
                   help="share of the cache pinned to the most used experts of the file's "
                   "calibrated routing (files converted with --calibrate), in the run and the "
                   "pinned curve (default: the run uses the file's measured share, the curve "
                   f"that or else {DEFAULT_PINNED_SHARE})")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=main)


def lru_hits(calls: list[tuple[int, np.ndarray]], n_expert: int, n_slots: int,
             n_layer: int = 0, count_from: int = 0) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for call, (layer, experts) in enumerate(calls):
        for e in experts:
            key = layer * n_expert + int(e)
            if key in cache:
                hits += call >= count_from
                cache.move_to_end(key)
            elif n_slots > 0:
                if len(cache) >= n_slots:
                    cache.popitem(last=False)
                cache[key] = None
    return hits


def opt_hits(calls: list[tuple[int, np.ndarray]], n_expert: int, n_slots: int,
             n_layer: int = 0, count_from: int = 0) -> int:
    """Belady: on a miss with the cache full, drop the expert needed furthest ahead."""
    seq = [layer * n_expert + int(e) for layer, experts in calls for e in experts]
    counted_from = sum(len(experts) for _, experts in calls[:count_from])  # in seq
    next_use = [0] * len(seq)
    last: dict[int, int] = {}
    for i in range(len(seq) - 1, -1, -1):
        next_use[i] = last.get(seq[i], len(seq))
        last[seq[i]] = i
    cache: dict[int, int] = {}  # key -> its next use
    hits = 0
    for i, key in enumerate(seq):
        if key in cache:
            hits += i >= counted_from
        elif n_slots > 0 and len(cache) >= n_slots:
            far = max(cache, key=cache.__getitem__)
            if cache[far] <= next_use[i]:
                continue  # this one is needed later than all of them: do not keep it
            del cache[far]
        if n_slots > 0:
            cache[key] = next_use[i]
    return hits


def skew(layer: np.ndarray, used: np.ndarray, n_layer: int) -> np.ndarray:
    """Per layer: the share of expert uses the most used tenth of its experts takes."""
    return top_tenth_share(np.stack([used[layer == L].sum(axis=0) for L in range(n_layer)]))


def main(args: argparse.Namespace) -> int:
    from .. import Llama
    from ..format import MoEFlashFile, open_any_flash_file
    from ..runtime import MoERuntime

    flash = open_any_flash_file(args.model)
    if not isinstance(flash, MoEFlashFile):
        raise ProfileError(f"{args.model} is not a mixture-of-experts flash GGUF")
    if args.tokens < 1:
        raise ProfileError("--tokens must be at least 1")
    budget: Any = args.budget
    try:
        budget = float(budget)
    except ValueError:
        pass
    load0 = load_average()
    llm = Llama(str(args.model), flash_offload=True, flash_dram_budget=budget, n_ctx=512,
                flash_pinned_share=args.pinned_share, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    try:
        runtime = llm.flash_runtime
        assert isinstance(runtime, MoERuntime)
        slots_run, pinned_run = runtime.slots, runtime.pinned
        runtime.predict_next_layer()
        runtime.trace_start(flash.n_layer * (args.tokens + 2))
        prompt = llm.tokenize(PROMPT.encode())
        note(f"prompt of {len(prompt)} tokens, then {args.tokens} decode tokens", args.quiet)
        llm.eval(prompt)
        after_prompt = runtime.stats()
        n_prompt_calls = flash.n_layer
        forced = None
        if args.teacher_forced:
            text, _where = evaluation_text(args.text)
            forced = llm.tokenize(text.encode(), add_bos=False)[:args.tokens]
            if len(forced) < args.tokens:
                raise ProfileError(f"the text has {len(forced)} tokens, fewer than --tokens")
        tok = greedy_next_token(llm)
        for i in range(args.tokens):
            llm.eval([tok if forced is None else forced[i]])
            tok = greedy_next_token(llm)
        stats = runtime.stats()
        layer, used = runtime.trace_take()
    finally:
        llm.close()
    calls = [(int(L), np.flatnonzero(u)) for L, u in zip(layer, used, strict=True)]
    n_total = flash.n_layer * flash.n_expert
    decode = calls[n_prompt_calls:]
    decode_uses = sum(len(e) for _, e in decode)
    check = clock_hits(calls, flash.n_expert, slots_run, flash.n_layer, pinned=pinned_run)
    if check != stats["expert_hits"]:
        raise ProfileError(f"the CLOCK simulation gives {check} hits where the runtime "
                           f"counted {stats['expert_hits']}: the simulation is out of date")
    curve_share = args.pinned_share if args.pinned_share is not None else \
        flash.pinned_share or DEFAULT_PINNED_SHARE
    rows = []
    for share in args.shares:
        n_slots = int(round(share * n_total))
        # the prompt warms the cache; hits are counted over the decode calls
        row: dict[str, Any] = dict(share=share, slots=n_slots,
                                   gib=n_slots * flash.expert_nbytes / 2**30)
        for name, fn in (("clock", clock_hits), ("lru", lru_hits), ("opt", opt_hits)):
            row[name] = fn(calls, flash.n_expert, n_slots, flash.n_layer,
                           count_from=n_prompt_calls) / max(decode_uses, 1)
        row["clock_pinned"] = None
        if flash.frequency is not None:
            pinned = pinned_experts(flash.frequency, n_slots, curve_share)
            row["clock_pinned"] = clock_hits(calls, flash.n_expert, n_slots, flash.n_layer,
                                             n_prompt_calls, pinned) / max(decode_uses, 1)
        best = max(row["clock"], row["clock_pinned"] or 0.0)
        row["read_mib_per_token"] = (1 - best) * decode_uses / args.tokens * \
            flash.expert_nbytes / MiB
        rows.append(row)
    decode_misses = stats["expert_misses"] - after_prompt["expert_misses"]
    guessed = max(stats["next_predicted"], 1)
    next_layer = dict(
        # the share of a decode token's experts at layer L + 1 that L's input through L + 1's
        # router guesses
        accuracy=stats["next_right"] / guessed,
        # a prefetch of the guesses not resident: reads per token, the share of them the
        # layer then used, and the share of the decode's misses they would have covered
        prefetch_per_token=stats["next_missed_predicted"] / args.tokens,
        prefetch_used=stats["next_right_missed"] / max(stats["next_missed_predicted"], 1),
        misses_covered=stats["next_right_missed"] / max(decode_misses, 1))
    if flash.n_layer > 1 and stats["next_predicted"] != \
            (flash.n_layer - 1) * flash.n_expert_used * args.tokens:
        raise ProfileError(f"{stats['next_predicted']} next-layer guesses scored, expected "
                           "one set per decode token and layer after the first")
    per_layer_skew = skew(layer[n_prompt_calls:], used[n_prompt_calls:], flash.n_layer)
    result = dict(model=str(args.model), arch=flash.arch, n_layer=flash.n_layer,
                  n_expert=flash.n_expert, n_expert_used=flash.n_expert_used,
                  expert_mib=flash.expert_nbytes / MiB, tokens=args.tokens,
                  teacher_forced=args.teacher_forced,
                  calibrated=flash.frequency is not None, pinned_share=curve_share,
                  file_pinned_share=flash.pinned_share,
                  prompt_tokens=len(prompt), run_slots=slots_run,
                  run_pinned=len(pinned_run),
                  run_hit_rate=stats["expert_hits"] / max(stats["expert_hits"]
                                                          + stats["expert_misses"], 1),
                  experts_per_token=decode_uses / args.tokens,
                  top_tenth_share=dict(min=float(per_layer_skew.min()),
                                       median=float(np.median(per_layer_skew)),
                                       max=float(per_layer_skew.max())),
                  curve=rows, next_layer=next_layer, load_average=[load0, load_average()])
    return emit(result, args.json, _table)


def _table(r: dict[str, Any]) -> None:
    print(f"{r['model']}: {r['arch']}, {r['n_layer']} layers x {r['n_expert']} experts "
          f"({r['n_expert_used']} per token) of {r['expert_mib']:.2f} MiB; "
          f"{r['experts_per_token']:.1f} expert uses per decode token")
    s = r["top_tenth_share"]
    print(f"routing skew: the most used tenth of a layer's experts takes {s['median']:.2f} "
          f"(median over layers; {s['min']:.2f}-{s['max']:.2f}) of its uses "
          f"(uniform routing: 0.10)")
    decode = "teacher-forced evaluation text" if r["teacher_forced"] else "greedy decode"
    print(f"hit rates over {r['tokens']} decode tokens ({decode}) after a "
          f"{r['prompt_tokens']}-token prompt (the run itself: {r['run_slots']} slots, "
          f"{r['run_pinned']} pinned, hit rate {r['run_hit_rate']:.3f} with the prompt)")
    pinned = f"CLOCK, {r['pinned_share']:g} pinned"
    if not r["calibrated"]:
        print("no calibrated routing in the file (convert with --calibrate): nothing pinned")
    else:
        print(f"the file's measured default pinned share: {r['file_pinned_share']:g}")
    print_table(["cached share", "slots", "GiB", "CLOCK", pinned, "LRU", "optimum",
                 "MiB read/token (best CLOCK)"],
                [[fmt(x["share"], ".2f"), str(x["slots"]), fmt(x["gib"], ".2f"),
                  fmt(x["clock"], ".3f"), fmt(x["clock_pinned"], ".3f"), fmt(x["lru"], ".3f"),
                  fmt(x["opt"], ".3f"), fmt(x["read_mib_per_token"], ".1f")]
                 for x in r["curve"]])
    n = r["next_layer"]
    print(f"next-layer guess (layer L's input through L + 1's router), over the decode: "
          f"{n['accuracy']:.3f} of the experts right; a prefetch of the guesses not resident "
          f"would read {n['prefetch_per_token']:.1f} experts per token, {n['prefetch_used']:.3f} "
          f"of them used, covering {n['misses_covered']:.3f} of the misses")
    print(f"load average {r['load_average'][0]:.2f} -> {r['load_average'][1]:.2f}")
