"""The GGUF writer's state machine: steps out of order, and values that would change the
laid-out header, are refused."""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType

from flashgguf.errors import FlashGGUFError, FormatError, WriterStateError
from flashgguf.format.gguf_writer import GGUFWriter


def _writer(f: BinaryIO) -> GGUFWriter:
    w = GGUFWriter(f, 0, "test", "test.gguf")
    w.add_key("test.count", 0, GGUFValueType.UINT64)
    w.add_key("test.name", "ab", GGUFValueType.STRING)
    w.add_tensor("t", (4,), GGMLQuantizationType.F32)
    return w


def test_steps_out_of_order_are_refused(tmp_path):
    f = open(tmp_path / "t.gguf", "wb")  # noqa: SIM115
    w = _writer(f)
    with pytest.raises(WriterStateError, match="writing tensor data while declaring"):
        w.write_tensor(np.zeros(4, np.float32))
    w.write_header()
    with pytest.raises(WriterStateError, match="adding key"):
        w.add_key("test.late", 1, GGUFValueType.UINT32)
    with pytest.raises(WriterStateError, match="finishing"):
        w.check_done()
    w.write_tensor(np.zeros(4, np.float32))
    w.check_done()
    with pytest.raises(WriterStateError):
        w.write_tensor(np.zeros(4, np.float32))
    assert issubclass(WriterStateError, FlashGGUFError)
    f.close()


def test_value_set_after_the_header_lands_at_its_offset(tmp_path):
    path = tmp_path / "t.gguf"
    with open(path, "wb") as f:
        w = _writer(f)
        w.write_header()
        w.write_tensor(np.zeros(4, np.float32))
        w.set_value("test.count", 7)
    raw = path.read_bytes()
    at = raw.index(b"test.count") + len(b"test.count") + 4  # after the key and its type
    assert int.from_bytes(raw[at:at + 8], "little") == 7
    assert len(raw) == w.nbytes
    with pytest.raises(FormatError, match="bytes"):
        w.set_value("test.name", "abc")
    with pytest.raises(FormatError, match="not a UINT64"):
        w.set_value("test.count", -1)
