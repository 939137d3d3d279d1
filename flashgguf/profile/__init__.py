"""flashgguf-profile: how fast is my disk for this, what budget do I need, how much faster
than llama.cpp's mmap is this in my RAM, where does a token's time go, what does a lower
recall cost me. One command, a subcommand per question, any model:

    flashgguf-profile io      [--path DIR] [--flash FILE]           the storage curve
    flashgguf-profile run     MODEL [flash options] [--trace FILE]  a per-token timeline
    flashgguf-profile bench   SOURCE.gguf [--flash FILE] --caps ... stock mmap vs flash, capped
    flashgguf-profile quality SOURCE.gguf [FLASH.gguf] [--run ...]  perplexity and top-1 vs stock
    flashgguf-profile replay  TRACE [--budget ... --shape 7b]       a trace through the cache
    flashgguf-profile experts MOE.flash.gguf [--tokens N]           routing and cache curve

Tables go to stdout for people; --json prints one JSON document instead. Progress goes to
stderr. Ctrl-C or SIGTERM leaves no child process, cgroup or scratch file behind."""

from __future__ import annotations

import argparse
import sys

from ..errors import FlashGGUFError
from ..interrupt import exit_status, sigterm_unwinds
from . import caps, experts, quality, replaying, storage, timeline


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashgguf-profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (storage, timeline, caps, quality, replaying, experts):
        module.add_parser(_WithCommon(sub, common))
    return p


class _WithCommon:
    """add_parser that gives every subcommand the common options (--json, --quiet)."""

    def __init__(self, sub: argparse._SubParsersAction, common: argparse.ArgumentParser):
        self._sub, self._common = sub, common

    def add_parser(self, name: str, **kw: object) -> argparse.ArgumentParser:
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        return self._sub.add_parser(name, parents=[self._common], **kw)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with sigterm_unwinds():
        try:
            return int(args.func(args))
        except FlashGGUFError as exc:
            print(f"flashgguf-profile {args.command}: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            print(f"flashgguf-profile {args.command}: interrupted", file=sys.stderr)
            return exit_status(exc)


if __name__ == "__main__":
    sys.exit(main())
