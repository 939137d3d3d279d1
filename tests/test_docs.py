"""README's format section lists every key and tensor name the format's constants define
(the constants are the contract; a key added without its line in README fails here)."""

from __future__ import annotations

import re
from pathlib import Path

from flashgguf.format import constants as C

README = Path(__file__).resolve().parents[1] / "README.md"


def _format_section() -> str:
    text = README.read_text()
    start = text.index("## The flash GGUF")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_lists_every_format_key_and_tensor():
    section = _format_section()
    names = {name: value for name, value in vars(C).items()
             if name.startswith(("KEY_", "TENSOR_")) and isinstance(value, str)}
    assert len(names) > 40  # the constants module was read
    # README writes related keys once with their shared prefix: "flashgguf.predictor.
    # threshold`, `.recall`", so a key counts as listed by its full name or by ".last_part"
    # on the line of a sibling's full name
    missing = []
    for name, value in names.items():
        shown = value.replace("blk.{bid}.", "blk.N.")
        if f"`{shown}`" in section:
            continue
        prefix, _, last = shown.rpartition(".")
        sibling = re.compile(rf"`{re.escape(prefix)}\.[a-z0-9_]+`")
        if not any(f"`.{last}`" in line and sibling.search(line)
                   for line in section.splitlines()):
            missing.append(f"{name} = {value!r}")
    assert not missing, "README's format section does not list: " + ", ".join(missing)
