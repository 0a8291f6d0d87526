"""Synthetic negative-binomial count data with cell types, batch effects and library sizes.

The generator is counter-based: every random number is a hash of ``(seed, cell, gene)``, so a
cell's counts do not depend on the chunking, the thread count or which other cells are drawn.
That lets :func:`write_synthetic_store` stream millions of cells in bounded memory and produce
exactly the cells :func:`synthetic_anndata` would hold in memory.

Model, per cell ``c`` of type ``t`` in batch ``b`` with library size ``L``::

    mu_cg = L * rho_tg * beta_bg,   x_cg ~ NB(mean mu_cg, inverse dispersion theta_g)

``rho_t`` is a gene program (log-normal baseline expression times type-specific marker fold
changes, normalised to sum to one), ``beta_b`` a multiplicative batch effect, ``L`` log-normal
(snapped to a fine log-spaced grid so that zero probabilities can be tabulated) with a per-batch
shift. The library scale is calibrated so the expected fraction of non-zeros is ``density``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

#: changes whenever the cells drawn for given parameters change (recorded in stores)
GENERATOR_VERSION = 2
_N_LIB_BINS = 24
_LIB_SIGMA = 0.45
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_GENE_STRIDE = np.uint64(0xD1B54A32D192ED03)


@njit(inline="always")
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def _uniform(key):
    return np.float64(_mix64(key) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(inline="always")
def _cell_key(seed, cell):
    return _mix64(np.uint64(seed) * _GOLDEN + np.uint64(cell) + np.uint64(1))


@njit(nogil=True, parallel=True, cache=True)
def _cell_covariates_inner(seed, start, n, n_cells, n_batches, type_cdf, lib_bin_cdf,
                           out_type, out_batch, out_bin):
    """Cell type (categorical draw), batch (contiguous runs, as in concatenated datasets) and
    library-size bin of cells ``start .. start + n``."""
    for i in prange(n):
        c = start + i
        key = _cell_key(seed, c)
        u = _uniform(key + _GOLDEN)
        t = 0
        while t < type_cdf.shape[0] - 1 and u >= type_cdf[t]:
            t += 1
        out_type[i] = t
        b = (c * n_batches) // max(n_cells, 1)
        out_batch[i] = b
        u = _uniform(key + np.uint64(2) * _GOLDEN)
        k = 0
        while k < lib_bin_cdf.shape[0] - 1 and u >= lib_bin_cdf[k]:
            k += 1
        out_bin[i] = k


@njit(nogil=True, parallel=True, cache=True)
def _count_nnz_inner(seed, start, cell_type, cell_batch, cell_bin, p0, n_bins, n_batches,
                     out_nnz, out_mask):
    """Pass 1: which genes are non-zero (``u >= P(x = 0)``), as a bit mask per cell, and how
    many; pass 2 then visits only those genes."""
    n_genes = p0.shape[1]
    for i in prange(cell_type.shape[0]):
        key = _cell_key(seed, start + i)
        row = (cell_type[i] * n_batches + cell_batch[i]) * n_bins + cell_bin[i]
        cnt = 0
        for w in range(out_mask.shape[1]):
            bits = np.uint64(0)
            g0 = w * 64
            for j in range(min(64, n_genes - g0)):
                g = g0 + j
                u = _uniform(key + np.uint64(g + 16) * _GENE_STRIDE)
                if u >= p0[row, g]:
                    bits |= np.uint64(1) << np.uint64(j)
                    cnt += 1
            out_mask[i, w] = bits
        out_nnz[i] = cnt


@njit(nogil=True, parallel=True, cache=True)
def _fill_counts_inner(seed, start, cell_type, cell_batch, cell_bin, p0, rho, beta, theta,
                       lib_values, n_bins, n_batches, mask, indptr, out_indices, out_data):
    """Pass 2: the same uniforms of the non-zero genes, inverted through the NB CDF."""
    for i in prange(cell_type.shape[0]):
        key = _cell_key(seed, start + i)
        t = cell_type[i]
        b = cell_batch[i]
        row = (t * n_batches + b) * n_bins + cell_bin[i]
        lib = lib_values[b, cell_bin[i]]
        o = indptr[i]
        for w in range(mask.shape[1]):
            bits = mask[i, w]
            j = 0
            while bits != np.uint64(0):
                if bits & np.uint64(1):
                    g = w * 64 + j
                    u = _uniform(key + np.uint64(g + 16) * _GENE_STRIDE)
                    p = np.float64(p0[row, g])
                    mu = lib * rho[t, g] * beta[b, g]
                    th = theta[g]
                    q = mu / (th + mu)
                    # walk the NB pmf: P(k+1) = P(k) * (k + theta) / (k + 1) * q
                    pk = p
                    cdf = p
                    k = 0
                    while True:
                        pk *= (k + th) / (k + 1.0) * q
                        k += 1
                        cdf += pk
                        if cdf > u or pk < 1e-300 or k > 1000000:
                            break
                    out_indices[o] = g
                    out_data[o] = k
                    o += 1
                bits >>= np.uint64(1)
                j += 1


@njit(nogil=True, parallel=True, cache=True)
def _zero_prob_inner(lib, rho, beta, theta, out):
    """``P(x = 0)`` of every (cell type, batch, library bin) row and gene, as float32:
    ``(theta / (theta + mu)) ** theta`` with ``mu = lib * rho * beta`` (the product in the
    order the fill pass uses)."""
    n_types, n_genes = rho.shape
    n_batches, n_bins = lib.shape
    log_theta = np.log(theta)
    for r in prange(n_types * n_batches * n_bins):
        t = r // (n_batches * n_bins)
        b = (r // n_bins) % n_batches
        k = r % n_bins
        for g in range(n_genes):
            th = theta[g]
            mu = lib[b, k] * rho[t, g] * beta[b, g]
            out[r, g] = np.float32(math.exp(th * (log_theta[g] - math.log(th + mu))))


class _Params:
    """Gene programs, batch effects, dispersions and library sizes of one synthetic dataset."""

    def __init__(self, n_genes, n_batches, n_cell_types, density, seed):
        rng = np.random.default_rng([seed, 7])
        g = n_genes
        base = rng.lognormal(0.0, 1.6, size=g)
        lfc = rng.normal(0.0, 0.25, size=(n_cell_types, g))
        n_markers = max(1, int(0.03 * g))
        for t in range(n_cell_types):
            markers = rng.choice(g, size=n_markers, replace=False)
            lfc[t, markers] += rng.normal(2.5, 0.6, size=n_markers)
        rho = base[None, :] * np.exp(lfc)
        self.rho = rho / rho.sum(axis=1, keepdims=True)
        self.beta = np.exp(rng.normal(0.0, 0.35, size=(n_batches, g)))
        self.theta = np.exp(rng.normal(math.log(2.0), 0.6, size=g))
        self.type_p = rng.dirichlet(np.full(n_cell_types, 3.0))
        self.batch_shift = rng.normal(0.0, 0.2, size=n_batches)
        # library bins: a +-3 sigma log-spaced grid with normal weights
        z = np.linspace(-3.0, 3.0, _N_LIB_BINS)
        w = np.exp(-0.5 * z**2)
        self.bin_p = w / w.sum()
        self.bin_z = z
        self.n_batches, self.n_types = n_batches, n_cell_types
        self.log_scale = self._calibrate(density)
        self.lib = np.exp(self.log_scale + self.batch_shift[:, None]
                          + _LIB_SIGMA * z[None, :])  # (n_batches, n_bins)
        # (types x batches x bins, genes): about 1 GB at 10 types, 128 batches, 8000 genes
        self.p0 = np.empty((n_cell_types * n_batches * _N_LIB_BINS, g), np.float32)
        _zero_prob_inner(self.lib, self.rho, self.beta, self.theta, self.p0)

    def _density(self, log_scale, genes, batches):
        """Expected fraction of non-zeros over ``genes`` x ``batches`` and its derivative in
        ``log_scale``."""
        th = self.theta[genes]
        lib = np.exp(log_scale + self.batch_shift[batches, None]
                     + _LIB_SIGMA * self.bin_z[None, :])
        mu = (lib[None, :, :, None] * self.rho[:, None, None, genes]
              * self.beta[None, batches][:, :, None, genes])
        p0 = np.exp(th * (np.log(th) - np.log(th + mu)))
        w = self.type_p[:, None, None] * self.bin_p[None, None, :] / len(batches)
        value = float(((1.0 - p0).mean(axis=-1) * w).sum())
        slope = float(((th * p0 * mu / (th + mu)).mean(axis=-1) * w).sum())
        return value, slope

    def _calibrate(self, density):
        """The log library scale whose expected density is ``density``: safeguarded Newton
        on a bracket (the density rises monotonically with the scale), over at most 2000
        genes and 16 batches (evenly spaced; the batch shifts are small), so that the cost
        does not grow with the data set."""
        if not 0.0 < density < 1.0:
            raise ValueError(f"density must lie in (0, 1), got {density}")
        g = self.rho.shape[1]
        genes = np.arange(g) if g <= 2000 else np.random.default_rng(0).choice(g, 2000, False)
        nb = self.n_batches
        batches = np.arange(nb) if nb <= 16 else np.unique(np.linspace(0, nb - 1, 16).round()
                                                           .astype(np.int64))
        lo, hi = -5.0, 25.0
        x = 0.5 * (lo + hi)
        for _ in range(200):
            value, slope = self._density(x, genes, batches)
            if value < density:
                lo = x
            else:
                hi = x
            step = (density - value) / slope if slope > 0 else math.inf
            if abs(step) < 1e-12:  # converged (quadratically): the rest is rounding noise
                return x + step
            x = x + step if lo < x + step < hi else 0.5 * (lo + hi)
            if hi - lo < 1e-12:
                return x
        return x


def _generate_chunk(params: _Params, seed, start, n, n_cells):
    """Cells ``start .. start + n`` as (indptr, indices int32, data float32, type, batch)."""
    ct = np.empty(n, np.int64)
    cb = np.empty(n, np.int64)
    cbin = np.empty(n, np.int64)
    _cell_covariates_inner(seed, start, n, n_cells, params.n_batches,
                           np.cumsum(params.type_p), np.cumsum(params.bin_p), ct, cb, cbin)
    nnz = np.empty(n, np.int64)
    n_genes = params.p0.shape[1]
    mask = np.empty((n, (n_genes + 63) // 64), np.uint64)
    _count_nnz_inner(seed, start, ct, cb, cbin, params.p0, _N_LIB_BINS, params.n_batches, nnz,
                     mask)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(nnz, out=indptr[1:])
    indices = np.empty(indptr[-1], np.int32)
    data = np.empty(indptr[-1], np.float32)
    _fill_counts_inner(seed, start, ct, cb, cbin, params.p0, params.rho, params.beta,
                       params.theta, params.lib, _N_LIB_BINS, params.n_batches, mask, indptr,
                       indices, data)
    return indptr, indices, data, ct, cb


def _names(prefix, n):
    width = len(str(max(n - 1, 0)))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)])


def synthetic_anndata(n_cells: int = 2000, n_genes: int = 1000, n_batches: int = 2,
                      n_cell_types: int = 5, density: float = 0.1, seed: int = 0,
                      chunk_size: int = 16384):
    """Realistic synthetic raw counts as an in-memory AnnData.

    Parameters
    ----------
    n_cells, n_genes
        Shape.
    n_batches
        Batches, laid out as contiguous runs of cells (like concatenated datasets), with
        multiplicative gene-wise effects and library-size shifts.
    n_cell_types
        Cell types, each with its own marker-gene program.
    density
        Expected fraction of non-zero entries (the library size is calibrated to it).
    seed
        Seed of everything; the same seed gives the same data.

    Returns
    -------
    anndata.AnnData
        ``X`` float32 CSR counts; obs ``batch`` and ``cell_type`` categoricals; gene names
        ``gene_0000``...; cell names ``cell_0000``... . A few cells can have zero counts at
        very low density; they are kept (filter them as with real data).
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    params = _Params(n_genes, n_batches, n_cell_types, density, seed)
    parts, types, batches = [], [], []
    for a in range(0, n_cells, chunk_size):
        n = min(chunk_size, n_cells - a)
        ip, ix, d, ct, cb = _generate_chunk(params, seed, a, n, n_cells)
        parts.append(sp.csr_matrix((d, ix, ip), shape=(n, n_genes)))
        types.append(ct)
        batches.append(cb)
    X = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, n_genes), dtype=np.float32)
    X = sp.csr_matrix(X, dtype=np.float32)
    ct = np.concatenate(types) if types else np.zeros(0, np.int64)
    cb = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    obs = pd.DataFrame(
        {"batch": pd.Categorical.from_codes(cb, [f"batch_{i}" for i in range(n_batches)]),
         "cell_type": pd.Categorical.from_codes(ct, [f"type_{i}" for i in range(n_cell_types)])},
        index=_names("cell_", n_cells),
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=_names("gene_", n_genes)))


def write_synthetic_store(path, n_cells: int, n_genes: int = 8000, n_batches: int = 4,
                          n_cell_types: int = 10, density: float = 0.1, seed: int = 0,
                          chunk_size: int = 16384, overwrite: bool = False):
    """Write :func:`synthetic_anndata`'s cells straight into a :class:`CSRStore`.

    Memory is bounded by ``chunk_size`` cells, so stores of millions of cells can be made on a
    small machine. Covariates are stored under ``batch`` and ``cell_type`` (labels).

    Returns
    -------
    CSRStore
        The opened store.
    """
    from ._convert import StoreWriter

    params = _Params(n_genes, n_batches, n_cell_types, density, seed)
    writer = StoreWriter(
        path, n_genes, _names("gene_", n_genes), batch_key="batch",
        batch_categories=[f"batch_{i}" for i in range(n_batches)], labels_key="cell_type",
        labels_categories=[f"type_{i}" for i in range(n_cell_types)], check=False,
        overwrite=overwrite, with_obs_names=False,
        extra={"synthetic": {"seed": seed, "density": density, "n_batches": n_batches,
                             "n_cell_types": n_cell_types, "version": GENERATOR_VERSION}},
    )
    import scipy.sparse as sp

    with writer:
        for a in range(0, n_cells, chunk_size):
            n = min(chunk_size, n_cells - a)
            ip, ix, d, ct, cb = _generate_chunk(params, seed, a, n, n_cells)
            writer.add(sp.csr_matrix((d, ix, ip), shape=(n, n_genes)), cb, ct)
        return writer.close()
