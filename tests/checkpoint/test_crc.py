"""The checkpoint reader's CRC-32 (ISA-L's where installed) is zlib's, whole or piece by piece."""

from __future__ import annotations

import os
import zlib

import pytest

from bridge_ext.checkpoint.crc import crc32


@pytest.mark.parametrize("size", [0, 1, 7, 4096, (1 << 20) + 3])
def test_crc32_is_zlibs(size):
    data = os.urandom(size)
    assert crc32(data) == zlib.crc32(data)
    half = size // 3
    assert crc32(memoryview(data)[half:], crc32(memoryview(data)[:half])) == zlib.crc32(data)
