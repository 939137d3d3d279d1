#!/usr/bin/env python3
"""Neuron-selection policies for gated (SwiGLU) FFNs, measured by a numpy forward pass of a
real GGUF (flashgguf.reference), teacher-forced on the first tokens of the evaluation text
(issue 11, part 1).

    python tools/selection.py [--model model.gguf] [--tokens 1000] [--window 0]
        [--oracle 50,55,60,70] [--gate-resident 70,80] [--cats 80] [--two-stage 75:55,80:55]
        [--json out.json]

Per policy: perplexity, its ratio to the dense numpy forward and to stock llama.cpp on the
same tokens (stock's own perplexity is the sanity anchor of the numpy forward), and per token,
as fractions of the FFN's bytes in the GGUF (gate + up + down, each at its own type):
READ (bytes fetched for the token without a cache), RESIDENT (always in DRAM: the gate rows of
the gate-resident policies), reuse (share of the token's up/down bytes the previous token also
needed) and MISS (what a cache holding the previous token's rows would still read: READ less
the reused bytes, gate rows included for the oracle).

Policies (percentages of each layer's neurons, a top-k per token and per layer):
  dense        every neuron;
  oracle p     top p% by exact contribution |h_i| * ||down_i|| (the bound; reads gate, up
               and down of the chosen neurons);
  gate p       gate rows resident, exact g, score |silu(g_i)| * rms(u_i) * ||down_i|| with
               rms(u_i) from the calibration text; up rows and down columns of the top p%;
  cats p       gate rows resident, score |silu(g_i)| (CATS), top p%;
  two p1:p2    gate resident; up rows for the top p1% by the gate score, exact h on them,
               then down columns only for the top p2% of all neurons by |h_i| * ||down_i||.

Windows: --window 0 scores all tokens in one causal window (as flashgguf-profile quality's
stock run); --window W splits them into windows of W tokens, each from an empty context (BOS
first), for stock and numpy alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from flashgguf.archs import get_arch
from flashgguf.calibrate.text import DEFAULT_CALIBRATION_TEXT
from flashgguf.evaluate import evaluation_tokens, teacher_forced_logits, token_nll
from flashgguf.format import tensor_array
from flashgguf.models import smollm2_gguf
from flashgguf.reference import ReferenceModel, forward, load_reference, silu

REPO = Path(__file__).resolve().parent.parent
SHARED_BROWN = REPO.parent / "shared" / "data" / "brown"
EVALUATION_HEAD = REPO / "flashgguf" / "data" / "evaluation_head.txt"


# ---------------------------------------------------------------- policies


@dataclass(frozen=True)
class Policy:
    kind: str  # dense | oracle | gate | cats | two
    keep: float = 1.0  # share of each layer's neurons (up rows for "two")
    keep_down: float = 1.0  # "two": share of down columns, chosen by exact contribution

    @property
    def name(self) -> str:
        if self.kind == "dense":
            return "dense"
        if self.kind == "two":
            return f"two {self.keep * 100:g}:{self.keep_down * 100:g}"
        return f"{self.kind} {self.keep * 100:g}"

    @property
    def gate_resident(self) -> bool:
        return self.kind in ("gate", "cats", "two")


def parse_policies(args: argparse.Namespace) -> list[Policy]:
    def shares(text: str) -> list[float]:
        return [float(s) / 100.0 for s in text.split(",") if s]

    out = [Policy("dense")]
    out += [Policy("oracle", p) for p in shares(args.oracle)]
    out += [Policy("gate", p) for p in shares(args.gate_resident)]
    out += [Policy("cats", p) for p in shares(args.cats)]
    for pair in filter(None, args.two_stage.split(",")):
        up, down = (float(s) / 100.0 for s in pair.split(":"))
        if down > up:
            raise SystemExit(f"--two-stage {pair}: down share above the up share")
        out.append(Policy("two", up, down))
    return out


def top_share(score: np.ndarray, share: float) -> np.ndarray:
    """Mask [n_tokens, n_ff] of each row's top share of scores (ties at the cut kept)."""
    n_ff = score.shape[1]
    k = int(round(share * n_ff))
    if k >= n_ff:
        return np.ones(score.shape, dtype=bool)
    if k <= 0:
        return np.zeros(score.shape, dtype=bool)
    cut = np.partition(score, n_ff - k, axis=1)[:, n_ff - k]
    return score >= cut[:, None]


@dataclass(frozen=True)
class LayerBytes:
    """Bytes per neuron of a layer's gate row, up row and down column, as the GGUF stores."""

    gate: float
    up: float
    down: float

    @property
    def total(self) -> float:
        return self.gate + self.up + self.down


@dataclass
class Tally:
    """Bytes summed over tokens and layers."""

    read: float = 0.0
    resident: float = 0.0
    ffn: float = 0.0  # the FFN's bytes, once per token
    up_down_needed: float = 0.0  # tokens after a window's first
    up_down_reused: float = 0.0
    miss: float = 0.0  # bytes a previous-token cache still reads (tokens after the first)
    ffn_after_first: float = 0.0

    def add(self, nb: LayerBytes, gate: np.ndarray | None, up: np.ndarray,
            down: np.ndarray) -> None:
        """Masks [n_tokens, n_ff] of the gate rows read (None: resident), up rows, down
        columns, for one layer over a window."""
        n_tokens, n_ff = up.shape
        self.ffn += n_tokens * n_ff * nb.total
        if gate is None:
            self.resident += n_tokens * n_ff * nb.gate
            gate_read = np.zeros(n_tokens)
            gate_reused = np.zeros(n_tokens - 1)
        else:
            gate_read = gate.sum(axis=1) * nb.gate
            gate_reused = (gate[1:] & gate[:-1]).sum(axis=1) * nb.gate
        ud = up.sum(axis=1) * nb.up + down.sum(axis=1) * nb.down
        ud_reused = ((up[1:] & up[:-1]).sum(axis=1) * nb.up
                     + (down[1:] & down[:-1]).sum(axis=1) * nb.down)
        self.read += float(gate_read.sum() + ud.sum())
        self.up_down_needed += float(ud[1:].sum())
        self.up_down_reused += float(ud_reused.sum())
        self.miss += float((gate_read[1:] - gate_reused + ud[1:] - ud_reused).sum())
        self.ffn_after_first += (n_tokens - 1) * n_ff * nb.total


def layer_bytes(model: ReferenceModel, layer: int) -> LayerBytes:
    spec = get_arch(model.arch)
    parts = []
    for template in (spec.ffn_gate, spec.ffn_up, spec.ffn_down):
        t = model.stream.tensors[template.format(bid=layer)]
        parts.append(tensor_array(model.buf, t).nbytes)
    n_ff = model.ffn(layer)[0].shape[0]
    return LayerBytes(*(p / n_ff for p in parts))


@dataclass
class LayerStats:
    down_norm: np.ndarray  # ||down_i||, column norms of down [n_ff]
    rms_up: np.ndarray  # rms(u_i) over the calibration tokens [n_ff]
    nbytes: LayerBytes


def policy_ffn(model: ReferenceModel, stats: list[LayerStats], policy: Policy,
               tally: Tally) -> Callable[[int, np.ndarray], np.ndarray]:
    """The FFN hook computing only what policy selects, tallying the bytes it reads."""

    def ffn(layer: int, x: np.ndarray) -> np.ndarray:
        gate_w, up_w, down_w = model.ffn(layer)
        st = stats[layer]
        a = silu(x @ gate_w.T)
        u = x @ up_w.T  # all rows; the masks below say which ones the policy reads
        if policy.kind == "dense":
            up = down = np.ones(a.shape, dtype=bool)
        elif policy.kind == "oracle":
            up = down = top_share(np.abs(a * u) * st.down_norm, policy.keep)
        else:
            score = np.abs(a) if policy.kind == "cats" else np.abs(a) * st.rms_up * st.down_norm
            up = down = top_share(score, policy.keep)
            if policy.kind == "two":
                exact = np.where(up, np.abs(a * u) * st.down_norm, -1.0)
                down = top_share(exact, policy.keep_down) & up
        gate = None if policy.gate_resident else up
        tally.add(st.nbytes, gate, up, down)
        return (a * u * down) @ down_w.T

    return ffn


# ---------------------------------------------------------------- runs


def split_windows(tokens: list[int], window: int, bos: int) -> list[list[int]]:
    """tokens (BOS first) in causal windows of `window` tokens; each window after the first
    starts with BOS, so every token after the first is predicted exactly once."""
    if window <= 0 or window >= len(tokens):
        return [tokens]
    out = [tokens[:window]]
    for start in range(window, len(tokens), window - 1):
        out.append([bos, *tokens[start:start + window - 1]])
    return out


def numpy_nll(model: ReferenceModel, windows: list[list[int]],
              ffn: Callable[[int, np.ndarray], np.ndarray] | None) -> np.ndarray:
    return np.concatenate([token_nll(forward(model, w, ffn), w) for w in windows])


def stock_nll(path: Path, windows: list[list[int]], n_batch: int, threads: int) -> np.ndarray:
    n_ctx = max(len(w) for w in windows)
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                          logits_all=True, verbose=False, n_threads=threads,
                          n_threads_batch=threads)
    try:
        return np.concatenate([token_nll(teacher_forced_logits(llm, w), w) for w in windows])
    finally:
        llm.close()


def calibration_stats(model: ReferenceModel, windows: list[list[int]]) -> list[LayerStats]:
    """Per layer: down's column norms, rms(u_i) over the calibration windows (dense
    forward), bytes per neuron."""
    sq = [np.zeros(model.ffn(i)[0].shape[0]) for i in range(model.n_layer)]
    count = [0]

    def record(layer: int, x: np.ndarray) -> np.ndarray:
        gate_w, up_w, down_w = model.ffn(layer)
        u = x @ up_w.T
        sq[layer] += (u.astype(np.float64) ** 2).sum(axis=0)
        if layer == 0:
            count[0] += x.shape[0]
        return (silu(x @ gate_w.T) * u) @ down_w.T

    for w in windows:
        forward(model, w, record)
    return [LayerStats(down_norm=np.linalg.norm(model.ffn(i)[2], axis=0),
                       rms_up=np.sqrt(sq[i] / count[0]).astype(model.dtype),
                       nbytes=layer_bytes(model, i))
            for i in range(model.n_layer)]


@dataclass
class Result:
    policy: str
    perplexity: float
    ratio_dense: float
    ratio_stock: float | None
    read: float
    resident: float
    reuse: float
    miss: float
    seconds: float


def measure(model: ReferenceModel, stats: list[LayerStats], windows: list[list[int]],
            policy: Policy, ppl_dense: float | None, ppl_stock: float | None) -> Result:
    t0 = time.perf_counter()
    tally = Tally()
    nll = numpy_nll(model, windows, policy_ffn(model, stats, policy, tally))
    ppl = float(np.exp(nll.mean()))
    return Result(
        policy=policy.name, perplexity=ppl, ratio_dense=ppl / (ppl_dense or ppl),
        ratio_stock=None if ppl_stock is None else ppl / ppl_stock,
        read=tally.read / tally.ffn, resident=tally.resident / tally.ffn,
        reuse=tally.up_down_reused / max(tally.up_down_needed, 1e-30),
        miss=tally.miss / max(tally.ffn_after_first, 1e-30),
        seconds=time.perf_counter() - t0)


def format_row(r: Result) -> str:
    stock = "-" if r.ratio_stock is None else f"{r.ratio_stock:.4f}"
    return (f"{r.policy:<12} {r.perplexity:10.3f} {r.ratio_dense:8.4f} {stock:>8} "
            f"{r.read:6.3f} {r.resident:8.3f} {r.reuse:6.3f} {r.miss:6.3f} {r.seconds:7.1f}")


def default_calibration_text() -> Path:
    shared = SHARED_BROWN / "calibration.txt"
    return shared if shared.exists() else DEFAULT_CALIBRATION_TEXT


def default_evaluation_text() -> Path:
    shared = SHARED_BROWN / "evaluation.txt"
    return shared if shared.exists() else EVALUATION_HEAD


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2)")
    p.add_argument("--tokens", type=int, default=1000, help="first tokens of the text scored")
    p.add_argument("--window", type=int, default=0,
                   help="tokens per causal window (0: all in one)")
    p.add_argument("--text", type=Path, default=None, help="evaluation text")
    p.add_argument("--calibration", type=Path, default=None,
                   help="calibration text for rms(u_i) (default: the shared Brown "
                   "calibration.txt, else flashgguf's)")
    p.add_argument("--calibration-tokens", type=int, default=1024)
    p.add_argument("--oracle", default="50,55,60,70", help="percentages, comma-separated")
    p.add_argument("--gate-resident", default="70,80", help="percentages")
    p.add_argument("--cats", default="80", help="percentages")
    p.add_argument("--two-stage", default="75:55,80:55", help="up%%:down%% pairs")
    p.add_argument("--no-stock", action="store_true", help="skip stock llama.cpp's anchor")
    p.add_argument("--n-batch", type=int, default=512, help="stock llama.cpp's batch")
    p.add_argument("--threads", type=int, default=2, help="stock llama.cpp's threads")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.model or smollm2_gguf())
    policies = parse_policies(args)
    eval_path = args.text or default_evaluation_text()
    cal_path = args.calibration or default_calibration_text()
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    tokens = evaluation_tokens(vocab, eval_path.read_text(encoding="utf-8"), args.tokens)
    cal_tokens = evaluation_tokens(vocab, cal_path.read_text(encoding="utf-8"),
                                   args.calibration_tokens)
    bos = vocab.token_bos()
    vocab.close()
    windows = split_windows(tokens, args.window, bos)
    window = args.window if 0 < args.window < len(tokens) else len(tokens)
    print(f"model {path.name}; first {len(tokens)} tokens of {eval_path.name} in "
          f"{len(windows)} window(s) of <= {window}; calibration: {len(cal_tokens)} tokens of "
          f"{cal_path}", flush=True)

    ppl_stock = None
    if not args.no_stock:
        t0 = time.perf_counter()
        ppl_stock = float(np.exp(stock_nll(path, windows, args.n_batch, args.threads).mean()))
        print(f"stock llama.cpp perplexity {ppl_stock:.3f} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    t0 = time.perf_counter()
    model = load_reference(path)
    stats = calibration_stats(model, split_windows(cal_tokens, window, bos))
    print(f"weights dequantized and calibrated in {time.perf_counter() - t0:.1f} s", flush=True)

    print(f"{'policy':<12} {'perplexity':>10} {'/dense':>8} {'/stock':>8} {'READ':>6} "
          f"{'RESIDENT':>8} {'reuse':>6} {'MISS':>6} {'seconds':>7}", flush=True)
    results: list[Result] = []
    for policy in policies:
        dense = results[0].perplexity if results else None
        results.append(measure(model, stats, windows, policy, dense, ppl_stock))
        print(format_row(results[-1]), flush=True)

    if args.json:
        args.json.write_text(json.dumps({
            "model": path.name, "tokens": len(tokens), "window": window,
            "text": str(eval_path), "calibration": str(cal_path),
            "calibration_tokens": len(cal_tokens), "stock_perplexity": ppl_stock,
            "selection": "top-k per token and per layer, one share for all layers",
            "results": [asdict(r) for r in results]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
