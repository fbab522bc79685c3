"""CRC-32 of checkpoint bytes: the zip format's checksum (zlib's), at memory speed where ISA-L is installed.

zlib's own ``crc32`` runs at about 1 GB/s per core, slower than the page cache delivers the
bytes; ISA-L's (``pip install isal``, the ``fast`` extra) computes the same checksum with
carry-less multiplication at several GB/s. Both release the GIL on large buffers.
"""

from __future__ import annotations

try:
    from isal.isal_zlib import crc32
except ImportError:  # the standard library's: the same values, slower
    from zlib import crc32

__all__ = ["crc32", "ACCELERATED"]

ACCELERATED: bool = crc32.__module__ != "zlib"
