"""The expert cache of native/moe.c, in Python: which experts to pin, and an exact
simulation of its eviction (CLOCK with use counts, pinned slots skipped), which
flashgguf-profile experts checks against the runtime's own hit count. The converter uses
both to decide, on held-out calibration routing, whether pinning pays for a file."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# the runtime's CLOCK (native/moe.c): use counts saturate here; pinned slots hold PINNED
MAX_COUNT = 3
PINNED = 255

# measured choices (recommend_pinned_share): cache sizes as shares of all experts, and
# the shares of a cache that may be pinned
CACHE_SHARES = (0.25, 0.5)
PIN_SHARES = (0.1, 0.25, 0.5)


def top_tenth_share(uses: np.ndarray) -> np.ndarray:
    """Per layer (rows of uses, counts or frequencies [n_layer, n_expert]): the share of its
    expert uses the most used tenth of its experts takes (0.1 under uniform routing)."""
    ordered = np.sort(uses, axis=1)[:, ::-1]
    top = ordered[:, :max(1, uses.shape[1] // 10)].sum(axis=1)
    return top / np.maximum(ordered.sum(axis=1), 1e-30)


def pinned_experts(frequency: np.ndarray | None, slots: int, share: float) -> np.ndarray:
    """The experts to pin (int32 keys layer * n_expert + expert, in file order): share of
    the cache's slots (one always left to the rest) taken by the experts a file's calibrated
    routing (float [n_layer, n_expert]) used most, over all layers: a slot saves its
    expert's frequency x its bytes per token, alike in every layer. None without
    frequencies."""
    if frequency is None or share <= 0.0:
        return np.zeros(0, np.int32)
    n = min(int(share * slots), max(slots - 1, 0))
    freq = frequency.reshape(-1)
    order = np.argsort(-freq, kind="stable")[:n]
    order = order[freq[order] > 0.0]  # an expert never chosen saves nothing
    return np.sort(order).astype(np.int32)


def clock_hits(calls: list[tuple[int, np.ndarray]], n_expert: int, n_slots: int,
               n_layer: int, count_from: int = 0, pinned: Sequence[int] = ()) -> int:
    """Hits of native/moe.c's cache over the calls (layer, experts used ascending), counted
    from call count_from on (the ones before only warm the cache), with the experts pinned
    (keys, at most n_slots - 1 of them) in the first slots."""
    if n_slots <= 0:
        return 0
    owner = [-1] * n_slots
    count = [0] * n_slots
    busy = [-1] * n_slots
    slot_of: dict[int, int] = {}
    for s, key in enumerate(pinned):
        owner[s], count[s], slot_of[int(key)] = int(key), PINNED, s
    hand = 0
    hits = 0
    for call, (layer, experts) in enumerate(calls):
        misses = []
        for e in experts:
            key = layer * n_expert + int(e)
            s = slot_of.get(key, -1)
            if s >= 0:
                hits += call >= count_from
                busy[s] = call
                if count[s] != PINNED:
                    count[s] = min(count[s] + 1, MAX_COUNT)
            else:
                misses.append(key)
        for key in misses:
            victim = -1
            for _ in range(n_slots * (MAX_COUNT + 2)):
                s = hand
                hand = (hand + 1) % n_slots
                if owner[s] < 0:
                    victim = s
                    break
                if busy[s] == call or count[s] == PINNED:
                    continue
                if count[s] > 0:
                    count[s] -= 1
                    continue
                if busy[s] + n_layer > call:
                    break  # a one-off of this token: not evicted for another
                victim = s
                break
            if victim < 0:
                continue
            if owner[victim] >= 0:
                del slot_of[owner[victim]]
            owner[victim], count[victim], busy[victim] = key, 0, call
            slot_of[key] = victim
    return hits


def token_calls(chosen: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Decode-order MoE calls (layer, experts ascending) of per-token routing (int
    [n_tokens, n_layer, n_used]): what a token-by-token run hands the cache."""
    ordered = np.sort(chosen, axis=2)
    return [(layer, ordered[t, layer]) for t in range(ordered.shape[0])
            for layer in range(ordered.shape[1])]


def recommend_pinned_share(frequency: np.ndarray, held_out: np.ndarray,
                           n_expert: int) -> tuple[float, list[dict[str, float]]]:
    """The share of an expert cache to pin, measured: frequencies from the fitting part
    of the calibration (float [n_layer, n_expert]) choose the pins, and CLOCK with and
    without them runs over the held-out routing (int [n_tokens, n_layer, n_used]) at each
    CACHE_SHARES size, hits counted after its first quarter (both caches warm). The pin
    share that gains most at its worst size, if it gains at every size, else 0: frequencies
    that do not carry over to new text make pinned slots cost hits. Also the table."""
    n_layer = held_out.shape[1]
    calls = token_calls(held_out)
    count_from = n_layer * (held_out.shape[0] // 4)
    uses = sum(len(e) for _, e in calls[count_from:])
    table = []
    for cache in CACHE_SHARES:
        slots = int(round(cache * n_layer * n_expert))
        row = dict(cache_share=cache,
                   clock=clock_hits(calls, n_expert, slots, n_layer, count_from) / uses)
        for pin in PIN_SHARES:
            row[f"pinned_{pin:g}"] = clock_hits(
                calls, n_expert, slots, n_layer, count_from,
                pinned_experts(frequency, slots, pin)) / uses
        table.append(row)
    best, best_gain = 0.0, 0.0
    for pin in PIN_SHARES:
        gain = min(row[f"pinned_{pin:g}"] - row["clock"] for row in table)
        if gain > best_gain:
            best, best_gain = pin, gain
    return best, table
