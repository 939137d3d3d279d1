"""Per-layer keeps for flash_mode="gate" (issue 11, part 4): how much of each layer's rows a
token keeps, allocated by the layer's measured sensitivity instead of one share for all.

The converter measures, per layer, the relative FFN output error of keeping each token's top
share by |act(gate)| for a grid of shares (GateCurves, on held-out calibration inputs). A
run's flash_gate_keep k then means "as accurate as every layer keeping k": the summed squared
errors of that uniform choice are the error budget, and layers whose error grows least per
byte saved keep fewer rows, the others more (greedy over the grid, cheapest error per byte
first), until the budget is spent."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GateCurves:
    """The converter's per-layer error curves: keep [K] ascending in (0, 1], error
    [n_layer, K] = ||y - y_kept|| / ||y|| of the layer's FFN output on held-out inputs."""

    keep: np.ndarray
    error: np.ndarray

    def uniform_error(self, layer: int, keep: float) -> float:
        """Layer's error at a share between grid points (linear); the grid's ends beyond."""
        return float(np.interp(keep, self.keep, self._monotone()[layer]))

    def _monotone(self) -> np.ndarray:
        # keeping fewer rows never measures as more accurate: sampling noise can make a
        # curve dip, and a dip would pull the allocation below a point it cannot afford
        return np.maximum.accumulate(self.error[:, ::-1], axis=1)[:, ::-1]

    def layer_keeps(self, target: float, row_bytes: Sequence[int]) -> tuple[float, ...]:
        """Each layer's keep for flash_gate_keep=target: the fewest bytes (row_bytes[l] per
        row of layer l) whose summed squared errors stay within those of every layer at
        target. Targets off the grid's range stay uniform."""
        n_layer, n_k = self.error.shape
        if len(row_bytes) != n_layer:
            raise ValueError(f"{len(row_bytes)} row sizes for {n_layer} layers")
        lo, hi = float(self.keep[0]), float(self.keep[-1])
        if not lo <= target <= hi:
            return (float(target),) * n_layer
        mono = self._monotone().astype(np.float64)
        err2 = np.square(mono)
        budget = sum(float(np.interp(target, self.keep, m)) ** 2 for m in mono)
        index = [n_k - 1] * n_layer  # every layer starts at the grid's largest keep
        spent = float(err2[:, -1].sum())

        def step(layer: int) -> tuple[float, int] | None:
            j = index[layer]
            if j == 0:
                return None
            saved = row_bytes[layer] * float(self.keep[j] - self.keep[j - 1])
            return (float(err2[layer, j - 1] - err2[layer, j]) / max(saved, 1e-30), layer)

        heap = [s for s in (step(i) for i in range(n_layer)) if s is not None]
        heapq.heapify(heap)
        while heap:
            _, layer = heapq.heappop(heap)
            j = index[layer]
            cost = float(err2[layer, j - 1] - err2[layer, j])
            if spent + cost > budget * (1.0 + 1e-9):
                continue  # this layer stays where it is; cheaper steps elsewhere may fit
            spent += cost
            index[layer] = j - 1
            nxt = step(layer)
            if nxt is not None:
                heapq.heappush(heap, nxt)
        return tuple(float(self.keep[j]) for j in index)
