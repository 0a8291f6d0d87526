"""The store format's constants, the error a damaged store raises and the advice every such
message ends with (shared by reading, checking and writing stores)."""

FORMAT = "scvi_fast.csr_store"
FORMAT_VERSION = 1
_CRC_BLOCK = 1 << 24
#: cells per checksummed chunk of indices.bin and data.bin: small enough that the first read
#: of a random block of rows checks little beyond it, large enough that the checksums cost
#: 8 bytes per 256 cells
CHUNK_ROWS = 256
#: the per-cell arrays: read whole when a store opens, so checked whole there
_PER_CELL = ("indptr", "batch", "labels", "source_rows")
#: the per-chunk checksum arrays, by the array they cover
_CHUNK_CRC = {"indices": "indices_crc32c", "data": "data_crc32c"}


class StoreCorruptError(ValueError):
    """A store directory is incomplete, truncated or fails its checksums."""


def _recreate(path) -> str:
    return (f"Re-create the store from its source: scvi_fast.data.CSRStore.create('{path}', "
            f"SOURCE, overwrite=True), or `scvi-fast convert SOURCE --out {path} --overwrite`.")
