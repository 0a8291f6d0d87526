"""CRC-32C (Castagnoli) checksums of array bytes, for the store's per-chunk checksums.

CRC-32C catches every burst error up to 32 bits and any other damage with probability
1 - 2^-32, and modern CPUs compute it in hardware: the optional ``google-crc32c`` package does
(about 12 GB/s on one core here, against 4 GB/s for ``zlib.crc32``). Without it a numba
slice-by-8 kernel computes the same values (about 1-2 GB/s), so a store written on one machine
verifies on any other.
"""

from __future__ import annotations

import numba
import numpy as np

_POLY = 0x82F63B78  # CRC-32C, reflected


def _tables() -> np.ndarray:
    t = np.zeros((8, 256), dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        t[0, i] = c
    for k in range(1, 8):
        for i in range(256):
            prev = int(t[k - 1, i])
            t[k, i] = (prev >> 8) ^ int(t[0, prev & 0xFF])
    return t


_TABLES = _tables()


@numba.njit(nogil=True, cache=True)
def _crc32c_inner(buf, crc, t):
    """CRC-32C of the bytes ``buf`` continuing from ``crc`` (slice-by-8 tables ``t``)."""
    c = np.uint32(crc) ^ np.uint32(0xFFFFFFFF)
    n = buf.shape[0]
    i = 0
    while i + 8 <= n:
        lo = c ^ (np.uint32(buf[i]) | (np.uint32(buf[i + 1]) << np.uint32(8))
                  | (np.uint32(buf[i + 2]) << np.uint32(16))
                  | (np.uint32(buf[i + 3]) << np.uint32(24)))
        c = (t[7, lo & np.uint32(0xFF)] ^ t[6, (lo >> np.uint32(8)) & np.uint32(0xFF)]
             ^ t[5, (lo >> np.uint32(16)) & np.uint32(0xFF)] ^ t[4, lo >> np.uint32(24)]
             ^ t[3, buf[i + 4]] ^ t[2, buf[i + 5]] ^ t[1, buf[i + 6]] ^ t[0, buf[i + 7]])
        i += 8
    while i < n:
        c = t[0, (c ^ np.uint32(buf[i])) & np.uint32(0xFF)] ^ (c >> np.uint32(8))
        i += 1
    return c ^ np.uint32(0xFFFFFFFF)


def crc32c_numba(arr: np.ndarray, crc: int = 0) -> int:
    """CRC-32C of ``arr``'s bytes with the numba kernel (the fallback; used in tests)."""
    buf = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return int(_crc32c_inner(buf, np.uint32(crc), _TABLES))


def _hardware():
    try:
        from google_crc32c import cext
    except ImportError:
        return None
    return cext


_CEXT = _hardware()


def crc32c(arr: np.ndarray, crc: int = 0) -> int:
    """CRC-32C of the bytes of a contiguous array, continuing from ``crc``.

    Parameters
    ----------
    arr
        A C-contiguous numpy array (any dtype; its bytes are checksummed) or bytes.
    crc
        The checksum of the bytes before these (0 to start).
    """
    if _CEXT is not None:
        buf = arr if isinstance(arr, bytes) else np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        return int(_CEXT.extend(crc, buf)) if crc else int(_CEXT.value(buf))
    if isinstance(arr, bytes):
        arr = np.frombuffer(arr, dtype=np.uint8)
    return crc32c_numba(arr, crc)


def backend() -> str:
    """``"google-crc32c"`` (hardware) or ``"numba"`` (the fallback)."""
    return "numba" if _CEXT is None else "google-crc32c"
