"""Hostile safetensors headers against the installed command (issue 14).

Each header problem is refused when the file is opened, before any tensor is allocated:
one ``convcli: error:`` line naming the problem, exit 65, under an address-space limit, and
an existing output file left byte for byte (tests/test_safetensors.py runs the same cases
in process, for ``inspect`` and ``forward``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tests import hostile

FAST = 30  # seconds


def raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", length=None) -> Path:
    """A safetensors file written byte by byte: 8-byte length, JSON header, data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(text) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + text + data)
    return path


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


def entry(**fields) -> dict:
    return {"w": {**GOOD["w"], **fields}}


HOSTILE = {
    "huge length": (GOOD, b"\0" * 16, 2**62, "header length"),
    "length past the end": (GOOD, b"\0" * 16, 10_000, "header length"),
    "bad JSON": (b'{"w": {"dtype": "F32",', b"", None, "JSON"),
    "a key twice": (
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        b"\0" * 4,
        None,
        "twice",
    ),
    "not an object": (b"[1, 2, 3]", b"", None, "not a .npy, .npz, HDF5 or safetensors file"),
    "no data_offsets": ({"w": {"dtype": "F32", "shape": [2, 2]}}, b"\0" * 16, None, "data_offsets"),
    "unknown dtype": (entry(dtype="F128"), b"\0" * 16, None, "F128"),
    "offsets out of the file": (entry(data_offsets=[0, 1 << 40]), b"\0" * 16, None, "outside"),
    "begin after end": (entry(data_offsets=[16, 0]), b"\0" * 16, None, "data_offsets"),
    "size mismatch": (entry(shape=[3, 3]), b"\0" * 16, None, "36"),
    "negative shape": (entry(shape=[-2, -2]), b"\0" * 16, None, "shape"),
    "overlap": (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
        None,
        "overlap",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_header_through_the_installed_command(case, tmp_path):
    header, data, length, words = HOSTILE[case]
    path = raw_safetensors(tmp_path / "bad.safetensors", header, data, length)
    out = tmp_path / "old.npz"
    np.savez(out, z=np.arange(3.0))
    with hostile.unchanged(out):
        result = hostile.run(
            "forward", "--x", path, "--w", path, "--out", out, "--force", cwd=tmp_path, timeout=FAST
        )
    line = hostile.one_error(result, 65)
    assert words in line, line
