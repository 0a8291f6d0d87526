"""Streaming validation of raw counts."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ._open import as_source
from ._source import Source

_N_SHOW = 5


def _fmt_cells(rows: list[int], obs_names) -> str:
    if obs_names is None:
        return ", ".join(str(r) for r in rows)
    return ", ".join(f"{r} ({obs_names[r]!s})" for r in rows)


class CountChecker:
    """Accumulates count problems over row chunks; :meth:`finish` raises one clear error.

    Parameters
    ----------
    obs_names
        Optional cell names (indexable by global row) used in messages.
    allow_zero_cells
        Do not complain about cells with zero total counts.
    what
        How the data is named in messages (e.g. ``"X"`` or ``"layer 'counts'"``).
    """

    def __init__(self, obs_names=None, allow_zero_cells: bool = False, what: str = "the data"):
        self.obs_names = obs_names
        self.allow_zero_cells = allow_zero_cells
        self.what = what
        self.n_zero = 0
        self.zero_rows: list[int] = []
        self.max_value = 0.0
        self.is_integer = True

    def update(self, start: int, chunk) -> None:
        """Check rows ``start : start + chunk.shape[0]`` given as a CSR matrix or dense array.

        Value problems (NaN/Inf, negative, non-integer) raise at once: the rest of the data
        cannot be interpreted. Zero-count cells are collected and reported by :meth:`finish`.
        """
        if sp.issparse(chunk):
            values = chunk.data
            row_sums = np.asarray(chunk.sum(axis=1, dtype=np.float64)).ravel()
        else:
            values = np.asarray(chunk).ravel()
            row_sums = np.asarray(chunk, dtype=np.float64).reshape(chunk.shape[0], -1).sum(axis=1)
        if values.size:
            if values.dtype.kind == "f":
                bad = ~np.isfinite(values)
                if bad.any():
                    row = self._row_of(chunk, int(np.argmax(bad)), start)
                    raise ValueError(
                        f"{self.what} contains {int(bad.sum())} NaN or infinite values in rows "
                        f"{start}-{start + chunk.shape[0] - 1} (first at cell "
                        f"{_fmt_cells([row], self.obs_names)}). scVI needs raw integer counts: "
                        "pass the raw count matrix (e.g. adata.layers['counts'] or adata.raw), "
                        "not normalised or imputed values."
                    )
            vmin = values.min()
            if vmin < 0:
                neg = values < 0
                row = self._row_of(chunk, int(np.argmax(neg)), start)
                raise ValueError(
                    f"{self.what} contains {int(neg.sum())} negative values in rows "
                    f"{start}-{start + chunk.shape[0] - 1} (minimum {vmin!r}, first at cell "
                    f"{_fmt_cells([row], self.obs_names)}). scVI needs raw non-negative counts: "
                    "the data looks scaled or centred; use the raw counts layer instead."
                )
            if values.dtype.kind == "f":
                frac = values != np.floor(values)
                if frac.any():
                    first = int(np.argmax(frac))
                    row = self._row_of(chunk, first, start)
                    raise ValueError(
                        f"{self.what} contains {int(frac.sum())} non-integer values in rows "
                        f"{start}-{start + chunk.shape[0] - 1} (e.g. {values[first]!r} at cell "
                        f"{_fmt_cells([row], self.obs_names)}). scVI models raw integer counts: "
                        "use the raw counts (adata.layers['counts'] or adata.raw.X), not "
                        "normalised or log-transformed values."
                    )
            self.max_value = max(self.max_value, float(values.max()))
        zero = np.flatnonzero(row_sums == 0)
        if zero.size:
            self.n_zero += int(zero.size)
            room = _N_SHOW - len(self.zero_rows)
            if room > 0:
                self.zero_rows.extend(int(start + z) for z in zero[:room])

    @staticmethod
    def _row_of(chunk, flat_pos: int, start: int) -> int:
        if sp.issparse(chunk):
            indptr = chunk.indptr
            return start + int(np.searchsorted(indptr, flat_pos, side="right") - 1)
        return start + flat_pos // max(1, int(np.prod(chunk.shape[1:])))

    def finish(self) -> None:
        """Raise ``ValueError`` if cells with zero total counts were seen."""
        if self.n_zero and not self.allow_zero_cells:
            more = " ..." if self.n_zero > len(self.zero_rows) else ""
            raise ValueError(
                f"{self.n_zero} cells have zero total counts (first: "
                f"{_fmt_cells(self.zero_rows, self.obs_names)}{more}). scVI conditions on the "
                "log library size, which is undefined for empty cells; remove them first, e.g. "
                "`sc.pp.filter_cells(adata, min_counts=1)` (after any gene subsetting)."
            )


def check_counts(
    source_or_matrix,
    layer: str | None = None,
    chunk_size: int = 65536,
    allow_zero_cells: bool = False,
) -> None:
    """Check that a matrix holds raw counts scVI can model, streaming over row chunks.

    Parameters
    ----------
    source_or_matrix
        A scipy sparse matrix, a dense array, or anything :func:`as_source` accepts (AnnData,
        ``.h5ad`` path, store, ...).
    layer
        AnnData layer to check instead of ``X``.
    chunk_size
        Rows read per chunk; memory stays bounded by one chunk.
    allow_zero_cells
        Accept cells with zero total counts.

    Raises
    ------
    ValueError
        On NaN/Inf, negative or non-integer values, or cells with zero total counts; the
        message says where and how to fix it.
    """
    if sp.issparse(source_or_matrix) or isinstance(source_or_matrix, np.ndarray):
        m = source_or_matrix
        if sp.issparse(m) and m.format != "csr":
            m = sp.csr_matrix(m)
        checker = CountChecker(allow_zero_cells=allow_zero_cells)
        for start in range(0, m.shape[0], chunk_size):
            checker.update(start, m[start : start + chunk_size])
        checker.finish()
        return
    src = source_or_matrix if isinstance(source_or_matrix, Source) else as_source(
        source_or_matrix, layer=layer
    )
    what = f"layer {layer!r}" if layer else "X"
    checker = CountChecker(src.obs_names, allow_zero_cells=allow_zero_cells, what=what)
    for start, chunk in src.iter_chunks(chunk_size):
        checker.update(start, chunk)
    checker.finish()
