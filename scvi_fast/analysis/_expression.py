"""Posterior quantities decoded from a VAE, streamed over CSR minibatches.

Everything here takes a module and an iterable of ``(host_minibatch, device_minibatch)``
pairs (what ``SCVI._iter`` yields, in row order) and never the user-facing model class, so
the same code serves ``get_normalized_expression``, ``posterior_predictive_sample`` and the
differential-expression sampler. Host memory is bounded by the result plus one minibatch:
results are written into a preallocated array, and decoding runs in chunks of at most
``max_rows`` rows of ``(cells x samples)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from scvi_fast.module import sample_z

from ._likelihood import has_library_encoder, library_draw, rate_library

from ._checks import check_finite

#: decode at most this many (cell, sample) rows at once: ``max_rows x n_genes`` floats
MAX_DECODE_ROWS = 4096


def _batch_tensor(x_batch: torch.Tensor, code: int | None, n: int) -> torch.Tensor:
    if code is None:
        return x_batch.reshape(-1)[:n]
    return torch.full((n,), int(code), dtype=torch.int64, device=x_batch.device)


def _posterior(module, x, library: bool = False, n_samples: int = 1, generator=None):
    """``(q_m, q_v)`` of a minibatch, and when asked its library: the observed one ``(B, 1)``
    (its size factors for a model with ``use_size_factor_key``), or for a library encoder
    ``n_samples`` posterior draws ``(n_samples, B, 1)`` (the size factors repeated, with
    ``use_size_factor_key``; the draws keep the noise stream as they are)."""
    q_m, q_v = module.posterior(x)
    if not library:
        return q_m, q_v, None
    if has_library_encoder(module):
        lib = rate_library(module, x, library_draw(module, x, max(n_samples, 1), generator))
        return q_m, q_v, lib.to(q_m.dtype).unsqueeze(-1)
    lib = x.size_factor if getattr(module, "use_size_factor_key", False) else x.library
    return q_m, q_v, lib.to(q_m.dtype).reshape(-1, 1)


def _covariates(x, rows=None) -> dict:
    """The extra covariates of minibatch ``x`` (of cells ``rows``: a slice or an index
    tensor), as :meth:`~scvi_fast.module.VAE.decode_scale` takes them beside the batch."""
    out = {}
    for name in ("cat_covs", "cont_covs"):
        t = getattr(x, name, None)
        if t is not None and rows is not None:
            t = t[rows] if isinstance(rows, slice) else t.index_select(0, rows)
        out[name] = t
    return out


def _as_index(gene_idx) -> torch.Tensor | None:
    if gene_idx is None or isinstance(gene_idx, slice):
        return None
    return torch.as_tensor(np.asarray(gene_idx, dtype=np.int64))


@torch.inference_mode()
def normalized_expression(
    module,
    batches: Iterable,
    n_cells: int,
    transform_codes: Sequence[int | None] = (None,),
    gene_idx: np.ndarray | None = None,
    library_size: float | str = 1.0,
    n_samples: int = 1,
    return_mean: bool = True,
    generator: torch.Generator | None = None,
    max_rows: int = MAX_DECODE_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised expression of every cell, averaged over ``transform_codes``.

    For each cell and posterior sample ``z ~ q(z|x)`` (the mean when ``n_samples=0``),
    decodes ``rho = softmax(f(z, b))`` for every batch code ``b`` in ``transform_codes``
    (``None``: the cell's own batch) and averages over them; ``library_size="latent"``
    scales by the observed library ``exp(l)`` (the NB mean), a number scales by it.

    Returns
    -------
    ``(values, obs_idx)``: ``values`` is ``(n_cells, n_genes)`` when ``n_samples == 1`` or
    ``return_mean``, else ``(n_samples, n_cells, n_genes)``, float32; ``obs_idx`` the source
    row of each cell in output order.
    """
    gidx = _as_index(gene_idx)
    n_out_genes = module.n_input if gidx is None else int(gidx.numel())
    keep_samples = n_samples > 1 and not return_mean
    shape = (n_samples, n_cells, n_out_genes) if keep_samples else (n_cells, n_out_genes)
    out = np.empty(shape, dtype=np.float32)
    obs_idx = np.empty(n_cells, dtype=np.int64)
    s_total = max(n_samples, 1)
    pos = 0
    for mb, x in batches:
        b = int(mb.n_cells)
        q_m, q_v, lib = _posterior(module, x, library_size == "latent", s_total, generator)
        acc = None if keep_samples else torch.zeros(b, n_out_genes, dtype=torch.float32, device=q_m.device)
        # chunk cells so that (samples x cells) rows decoded at once stay below max_rows
        step = max(1, max_rows // s_total)
        for c0 in range(0, b, step):
            c1 = min(b, c0 + step)
            m = q_m[c0:c1]
            z = (sample_z(m, q_v[c0:c1], s_total, generator).reshape(-1, m.shape[1])
                 if n_samples >= 1 else m)
            rows = z.shape[0]
            expr = None
            for code in transform_codes:
                codes = _batch_tensor(x.batch[c0:c1], code, c1 - c0).repeat(rows // (c1 - c0))
                e = module.decode_scale(z, codes, **_covariates(x, slice(c0, c1)))
                if gidx is not None:
                    e = e.index_select(-1, gidx.to(e.device))
                expr = e if expr is None else expr.add_(e)
            expr = expr.div_(len(transform_codes)).reshape(-1, c1 - c0, n_out_genes)
            if lib is not None:
                expr = expr * (lib[:, c0:c1] if lib.dim() == 3 else lib[c0:c1].unsqueeze(0))
            elif library_size != 1:
                expr = expr * float(library_size)
            if keep_samples:
                out[:, pos + c0 : pos + c1] = expr.float().cpu().numpy()
            else:
                acc[c0:c1] = expr.mean(0).float()
        if not keep_samples:
            out[pos : pos + b] = acc.cpu().numpy()
        obs_idx[pos : pos + b] = np.asarray(mb.obs_idx)
        pos += b
    if pos != n_cells:
        raise RuntimeError(f"the minibatches held {pos} cells, expected {n_cells}")
    check_finite(out, "the normalized expression")
    return out, obs_idx


@torch.inference_mode()
def sample_scales(
    module,
    batches: Iterable,
    n_cells: int,
    n_draws: int,
    transform_code: int | None,
    rng: np.random.Generator,
    generator: torch.Generator | None = None,
    max_rows: int = MAX_DECODE_ROWS,
) -> np.ndarray:
    """``n_draws`` posterior samples of ``rho``, drawn as scvi-tools' DE sampler draws them.

    scvi-tools draws ``n = n_draws // n_cells + 1`` samples of ``z`` for every cell, decodes
    all ``n * n_cells`` of them, and keeps ``n_draws`` rows picked uniformly with
    replacement. The same distribution is drawn here without decoding the rows that would
    be thrown away: the ``n_draws`` picks of ``(sample, cell)`` are made first, and only
    the distinct picked pairs are sampled and decoded (a pair picked twice gives the same
    row twice, as in scvi-tools). Cost is ``O(n_draws)`` decoder rows instead of
    ``O(n_cells * n)``, and memory ``n_draws x n_genes``.

    Returns
    -------
    ``(n_draws, n_genes)`` float32, in draw order.
    """
    if n_cells < 1:
        raise ValueError("cannot sample the posterior of an empty cell group")
    n_per_cell = n_draws // n_cells + 1
    flat = rng.integers(0, n_per_cell * n_cells, size=n_draws)
    uniq, inverse = np.unique(flat, return_inverse=True)
    cell_of = uniq % n_cells  # position of the cell in iteration order
    order = np.argsort(cell_of, kind="stable")
    cells_sorted = cell_of[order]
    out = np.empty((len(uniq), module.n_input), dtype=np.float32)
    pos = 0
    for mb, x in batches:
        b = int(mb.n_cells)
        lo, hi = np.searchsorted(cells_sorted, [pos, pos + b])
        if hi > lo:
            q_m, q_v, _ = _posterior(module, x)
            for r0 in range(lo, hi, max_rows):
                r1 = min(hi, r0 + max_rows)
                pair = order[r0:r1]
                local = torch.as_tensor(cell_of[pair] - pos, device=q_m.device)
                z = sample_z(q_m.index_select(0, local), q_v.index_select(0, local),
                             generator=generator)
                codes = (x.batch.reshape(-1).index_select(0, local) if transform_code is None
                         else _batch_tensor(x.batch, transform_code, len(pair)))
                rho = module.decode_scale(z, codes, **_covariates(x, local))
                out[pair] = rho.float().cpu().numpy()
        pos += b
    if pos != n_cells:
        raise RuntimeError(f"the minibatches held {pos} cells, expected {n_cells}")
    return out[inverse.reshape(-1)]


@torch.inference_mode()
def posterior_predictive(
    module,
    batches: Iterable,
    n_samples: int = 1,
    transform_codes: Sequence[int | None] = (None,),
    gene_idx: np.ndarray | None = None,
    generator: torch.Generator | None = None,
    max_poisson_rate: float = 1e8,
):
    """Yield, per minibatch, counts drawn from ``p(x_hat | x)``: ``z ~ q(z|x)`` (and the library
    from the library encoder's posterior where the model has one), ``x_hat ~ p(x | z, l)``.

    As scvi-tools: NB draws are Gamma-Poisson, ``w ~ Gamma(theta, rate=theta/mu)``,
    ``x_hat ~ Poisson(min(w, max_poisson_rate))`` with ``mu = exp(l) * rho`` and
    ``theta = exp(px_r)``; ZINB sets a draw to zero where a uniform draw is at most the
    zero-inflation probability ``sigmoid(px_dropout)``; Poisson draws
    ``Poisson(min(mu, max_poisson_rate))``. With several ``transform_codes`` the draws are
    averaged over them (scvi-tools does the same). Yields ``(obs_idx, samples)`` with
    ``samples`` a float32 tensor ``(B, G)`` for one sample, else ``(B, G, n_samples)``.
    """
    gidx = _as_index(gene_idx)
    likelihood = getattr(module, "gene_likelihood", "nb")
    for mb, x in batches:
        b = int(mb.n_cells)
        q_m, q_v, lib = _posterior(module, x, True, n_samples, generator)
        lib = lib.reshape(-1, b, 1)
        z = sample_z(q_m, q_v, n_samples, generator).reshape(-1, q_m.shape[1])
        labels = getattr(x, "labels", None)
        labels = None if labels is None else labels.reshape(-1)[:b]
        acc = None
        for code in transform_codes:
            codes = _batch_tensor(x.batch, code, b).repeat(n_samples)
            gen = module.generative(module.z_transformation(z), codes, logits=True,
                                    labels=labels, **_covariates(x))
            pick = (lambda t: t) if gidx is None else (
                lambda t: t.index_select(-1, gidx.to(t.device)))
            mu = lib * pick(module.px_scale(gen["logits"]).reshape(n_samples, b, -1))
            if likelihood == "poisson":
                s = torch.poisson(torch.clamp(mu, max=max_poisson_rate), generator=generator)
            else:
                theta = pick(torch.exp(gen["px_r"].float()))
                if theta.dim() > 1:  # per-cell dispersions, (samples x cells, G)
                    theta = theta.reshape(n_samples, b, -1)
                conc = theta.expand_as(mu).contiguous()
                w = torch._standard_gamma(conc, generator=generator) * mu / conc
                s = torch.poisson(torch.clamp(w, max=max_poisson_rate), generator=generator)
                if likelihood == "zinb":
                    pi = torch.sigmoid(pick(gen["px_dropout"].float()).reshape(n_samples, b, -1))
                    u = torch.rand(pi.shape, dtype=pi.dtype, device=pi.device,
                                   generator=generator)
                    s = torch.where(u <= pi, torch.zeros_like(s), s)
            acc = s if acc is None else acc + s
        acc = acc / len(transform_codes)
        acc = acc[0] if n_samples == 1 else acc.permute(1, 2, 0)
        yield np.asarray(mb.obs_idx).copy(), acc.float().cpu()
