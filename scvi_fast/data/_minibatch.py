"""What the loader yields: a CSR minibatch on the host (numpy) and on a device (torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


#: the optional per-cell model inputs a minibatch may carry (see :class:`CSRMinibatch`)
COVARIATE_FIELDS = ("cat_covs", "cont_covs", "size_factor")


@dataclass
class CSRMinibatch:
    """A minibatch of cells as CSR arrays on the host (never densified).

    Attributes
    ----------
    indptr : int64 (n_cells + 1,)
    indices : int32 (nnz,) gene indices
    values : float32 (nnz,) exact counts
    batch, labels : int64 (n_cells,) covariate codes
    library : float32 (n_cells,) total counts per cell (row sums)
    obs_idx : int64 (n_cells,) source row of each cell
    n_genes : int
    cat_covs : int64 (n_cells, n_cat) extra categorical covariate codes, or None
    cont_covs : float32 (n_cells, n_cont) continuous covariates, or None
    size_factor : float32 (n_cells,) size factors, or None
    """

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    batch: np.ndarray
    labels: np.ndarray
    library: np.ndarray
    obs_idx: np.ndarray
    n_genes: int
    cat_covs: np.ndarray | None = None
    cont_covs: np.ndarray | None = None
    size_factor: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        return int(self.indptr.shape[0] - 1)

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def __len__(self) -> int:
        return self.n_cells

    def to_scipy(self):
        """The counts as a scipy CSR matrix (shares memory)."""
        return sp.csr_matrix((self.values, self.indices, self.indptr),
                             shape=(self.n_cells, self.n_genes))

    def to_dense(self) -> np.ndarray:
        """Dense float32 counts (for tests and small inputs only)."""
        return self.to_scipy().toarray()

    def to(self, device="cpu", non_blocking: bool = True, indices_dtype=None) -> TorchMinibatch:
        """Move to a torch device.

        Parameters
        ----------
        device
            A torch device or its name (``"cuda"``, ``"cuda:1"``, ``"cpu"``, ...).
        non_blocking
            Use asynchronous host-to-device copies (CUDA, from pinned memory).
        indices_dtype
            torch dtype of ``indices`` on the device (default ``torch.int64``; the int32 host
            array is sent as is and widened on the device).

        Returns
        -------
        TorchMinibatch
            The same fields as tensors: ``indptr`` int64, ``indices`` int64 (or
            ``indices_dtype``), ``values`` float32, ``batch``/``labels`` int64, ``library``
            float32, ``obs_idx`` int64, and the covariates the minibatch carries
            (``cat_covs``, ``cont_covs``, ``size_factor``; None where absent). On the CPU,
            tensors share memory with the arrays where dtypes allow.
        """
        import torch

        device = torch.device(device)
        idt = torch.int64 if indices_dtype is None else indices_dtype
        fields = ("indptr", "indices", "values", "batch", "labels", "library", "obs_idx") + tuple(
            f for f in COVARIATE_FIELDS if getattr(self, f) is not None)
        out = {}
        if device.type == "cpu":
            for f in fields:
                out[f] = torch.from_numpy(np.ascontiguousarray(getattr(self, f)))
            out["indices"] = out["indices"].to(idt)
        else:
            pin = device.type == "cuda" and torch.cuda.is_available()
            for f in fields:
                host = torch.from_numpy(np.ascontiguousarray(getattr(self, f)))
                if pin:
                    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
                    pinned.copy_(host)
                    host = pinned
                out[f] = host.to(device, non_blocking=non_blocking and pin)
            out["indices"] = out["indices"].to(idt)
        return TorchMinibatch(n_genes=self.n_genes, **out)


@dataclass
class TorchMinibatch:
    """A :class:`CSRMinibatch` as torch tensors on a device (same field names)."""

    indptr: object
    indices: object
    values: object
    batch: object
    labels: object
    library: object
    obs_idx: object
    n_genes: int
    cat_covs: object = None
    cont_covs: object = None
    size_factor: object = None

    @property
    def n_cells(self) -> int:
        return int(self.indptr.shape[0] - 1)

    def to_dense(self):
        """Dense (n_cells, n_genes) float32 tensor on the same device."""
        import torch

        n = self.n_cells
        rows = torch.repeat_interleave(torch.arange(n, device=self.values.device),
                                       self.indptr[1:] - self.indptr[:-1])
        out = torch.zeros(n, self.n_genes, dtype=self.values.dtype, device=self.values.device)
        out[rows, self.indices.long()] = self.values
        return out
