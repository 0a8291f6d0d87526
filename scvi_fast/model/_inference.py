"""Inference adapters: what :class:`scvi_fast.SCVI`'s analysis methods do with the model.

Each function resolves the model's data, codes and device and calls :mod:`scvi_fast.analysis`,
which never sees the model class.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scvi_fast import analysis
from scvi_fast.analysis import check_finite
from scvi_fast.model import _data
from scvi_fast.model._registry import open_data
from scvi_fast.train import _distributed


def latent(model, adata, indices, give_mean, batch_size, return_dist, out, progress_bar,
           precision, mc_samples=5000):
    """``get_latent_representation``: one process, or this rank's share of a job."""
    batch_size = batch_size or analysis.default_batch_size(model.device)
    source = model._source(adata)
    ctx = _distributed.active()
    # an encoder that reads covariates needs whole minibatches, not the CSR-only fast path
    if ctx is not None or model.module.encode_covariates:
        rows = (np.arange(source.n_cells) if indices is None
                else np.asarray(indices, dtype=np.int64))
        Z = model.module.n_latent
        model.module.to(model.device).eval()
        with torch.inference_mode():
            res = analysis.map_rows(
                analysis.latent_fn(model.module, give_mean=give_mean, return_dist=return_dist,
                                   precision=precision, mc_samples=mc_samples),
                lambda idx: model._loader(source, indices=idx, batch_size=batch_size), rows,
                2 * Z if return_dist else Z, model.device, ctx=ctx, out=out,
            )
        return (res[:, :Z], res[:, Z:]) if return_dist else res
    if out is not None and return_dist:
        raise ValueError("return_dist=True cannot be combined with out=")
    n = source.n_cells if indices is None else len(indices)
    batches = analysis.in_order_batches(source, batch_size) if indices is None else None
    if batches is None:
        # on a GPU the loader gathers into pinned memory, copied from without staging
        batches = model._loader(source, indices=indices, batch_size=batch_size,
                                pin_memory=model.device.type == "cuda")
    return analysis.latent_representation(
        model.module, batches, n, model.device, give_mean=give_mean, return_dist=return_dist,
        out=out, precision=precision, progress_bar=progress_bar, mc_samples=mc_samples,
    )


def _gene_index(var_names: pd.Index, gene_list) -> np.ndarray | None:
    if gene_list is None:
        return None
    missing = [g for g in gene_list if g not in set(var_names)]
    if missing:
        raise KeyError(f"genes not in the model: {missing[:10]}")
    return var_names.get_indexer(list(gene_list))


def no_dataloader(dataloader, data_loader_kwargs=None) -> None:
    """scvi-tools' ``dataloader`` / ``data_loader_kwargs`` options: scvi_fast reads the data
    itself (refused / ignored with a warning)."""
    if dataloader is not None:
        raise NotImplementedError("dataloader= is not supported: pass adata (and indices)")
    if data_loader_kwargs:
        warnings.warn(f"data_loader_kwargs {sorted(data_loader_kwargs)} are ignored: scvi_fast "
                      "reads minibatches with its own loader", UserWarning, stacklevel=3)


def _rows(model, adata, indices) -> np.ndarray:
    return (np.arange(model._n_rows(adata)) if indices is None
            else np.asarray(indices, dtype=np.int64).reshape(-1))


def _row_batches(model, adata, batch_size):
    """``rows -> (host, device) minibatches`` of ``adata`` (the model's data by default)."""
    source = model._source(adata)
    return lambda rows: _data.batches(model.module, model.device, source, rows, batch_size)


@torch.inference_mode()
def normalized_expression(model, adata, indices, transform_batch, gene_list, library_size,
                          n_samples, batch_size, return_mean, return_numpy, n_samples_overall=None,
                          weights=None, importance_kwargs=None):
    """``get_normalized_expression``: a DataFrame (cells x genes) or a numpy array; with
    ``n_samples_overall``, that many rows drawn from the ``(samples x cells)`` decoded rows
    (uniformly or with importance weights), an array ``(n_samples_overall, genes)``."""
    if weights not in (None, "uniform", "importance"):
        raise ValueError(f"weights must be 'uniform' or 'importance'; got {weights!r}")
    if n_samples_overall is not None:
        return _sampled_expression(model, adata, indices, transform_batch, gene_list,
                                   library_size, n_samples, batch_size, n_samples_overall,
                                   weights, importance_kwargs or {})
    if weights == "importance":
        raise ValueError("weights='importance' draws n_samples_overall samples: pass it too")
    if n_samples > 1 and not return_mean:
        if return_numpy is False:
            warnings.warn("`return_numpy` must be `True` if `n_samples > 1` and `return_mean` "
                          "is`False`, returning an `np.ndarray`.", UserWarning, stacklevel=3)
        return_numpy = True
    gene_idx = _gene_index(model.var_names, gene_list)
    result, obs_idx = analysis.normalized_expression(
        model.module, model._iter(adata, indices, batch_size), model._n_rows(adata, indices),
        transform_codes=transform_codes(model.registry, transform_batch), gene_idx=gene_idx,
        library_size=library_size, n_samples=n_samples, return_mean=return_mean,
    )
    if return_numpy:
        return result
    names = getattr(model.adata if adata is None else adata, "obs_names", None)
    index = pd.Index(np.asarray(names)[obs_idx]) if names is not None else None
    columns = model.var_names if gene_list is None else pd.Index(list(gene_list))
    return pd.DataFrame(result, index=index, columns=columns)


def _sampled_expression(model, adata, indices, transform_batch, gene_list, library_size,
                        n_samples, batch_size, n_samples_overall, weights, importance_kwargs):
    """scvi-tools' ``n_samples_overall`` path: ``n = n_samples_overall // n_cells + 1`` samples
    of every cell decoded, then ``n_samples_overall`` of those ``n * n_cells`` rows drawn with
    replacement, uniformly or with importance weights."""
    if n_samples != 1:
        raise ValueError("n_samples_overall replaces n_samples: leave n_samples at 1")
    rows = _rows(model, adata, indices)
    if len(rows) == 0:
        raise ValueError("no cells to sample from")
    codes = transform_codes(model.registry, transform_batch)
    gene_idx = _gene_index(model.var_names, gene_list)
    # drawn from numpy's global generator, as scvi-tools (np.random.seed makes it repeatable)
    rng = np.random.default_rng(np.random.randint(2**31))
    if weights == "importance":
        if len(codes) > 1:
            raise NotImplementedError("Importance weights cannot be computed when expression "
                                      "levels are averaged across batches.")
        return analysis.importance_sample(
            model.module, _row_batches(model, adata, batch_size), rows, n_samples_overall,
            codes[0], rng, library_size=library_size, gene_idx=gene_idx, **importance_kwargs)
    if importance_kwargs:
        raise TypeError(f"unexpected arguments {sorted(importance_kwargs)} (importance "
                        "weighting options need weights='importance')")
    per_cell = n_samples_overall // len(rows) + 1
    values, _ = analysis.normalized_expression(
        model.module, model._iter(adata, rows, batch_size), len(rows), transform_codes=codes,
        gene_idx=gene_idx, library_size=library_size, n_samples=per_cell, return_mean=False)
    values = values.reshape(-1, values.shape[-1])
    return values[rng.choice(values.shape[0], n_samples_overall, replace=True)]


def transform_codes(registry, transform_batch) -> list[int | None]:
    """Batch codes to decode in: None (each cell's own batch) or the named categories."""
    if transform_batch is None:
        return [None]
    items = transform_batch if isinstance(transform_batch, (list, tuple)) else [transform_batch]
    return registry.codes_for([str(b) for b in items], "batch").tolist()


@torch.inference_mode()
def posterior_predictive(model, adata, indices, transform_batch, n_samples, gene_list,
                         batch_size):
    """``posterior_predictive_sample``: sparse counts, ``(cells, genes[, samples])``."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1; got {n_samples}")
    gene_idx = None
    if gene_list is not None:
        mask = model.var_names.isin(list(gene_list))
        if not mask.any():
            raise ValueError("None of the provided genes in ``gene_list`` were detected in the data.")
        gene_idx = np.flatnonzero(mask)
    n_genes = len(model.var_names) if gene_idx is None else len(gene_idx)
    parts = [
        sp.csr_array(s.numpy()) if n_samples == 1 else sp.coo_array(s.numpy())
        for _, s in analysis.posterior_predictive(
            model.module, model._iter(adata, indices, batch_size), n_samples=n_samples,
            transform_codes=transform_codes(model.registry, transform_batch), gene_idx=gene_idx)
    ]
    if n_samples == 1:
        if not parts:
            return sp.csr_array((0, n_genes), dtype=np.float32)
        return sp.vstack(parts, format="csr")
    if not parts:
        return sp.coo_array((0, n_genes, n_samples), dtype=np.float32)
    offsets = np.cumsum([0] + [p.shape[0] for p in parts[:-1]])
    rows = np.concatenate([p.coords[0] + o for p, o in zip(parts, offsets)])
    rest = [np.concatenate([p.coords[k] for p in parts]) for k in (1, 2)]
    data = np.concatenate([p.data for p in parts])
    n_cells = int(sum(p.shape[0] for p in parts))
    return sp.coo_array((data, (rows, *rest)), shape=(n_cells, n_genes, n_samples))


def differential_expression(model, adata, batch_size, batch_correction, batchid1, batchid2,
                            n_samples, weights, importance_weighting_kwargs=None, **kwargs):
    """``differential_expression``: codes of the decoding batches, then :mod:`analysis`."""
    if n_samples is not None:
        if "n_samples_overall" in kwargs and kwargs["n_samples_overall"] != n_samples:
            raise ValueError("pass either n_samples or n_samples_overall, not both")
        kwargs["n_samples_overall"] = n_samples
    if not batch_correction and (batchid1 is not None or batchid2 is not None):
        raise ValueError(
            "batchid1/batchid2 choose the batches to decode in, which needs "
            "batch_correction=True (scvi-tools: 'Inconsistent batch policy')"
        )
    codes = [None, None]
    if batch_correction:
        every = list(range(model.registry.n_batch))
        codes = [every if b is None else transform_codes(model.registry, list(b))
                 for b in (batchid1, batchid2)]
    data = open_data(model.adata if adata is None else adata)
    source = model._source(data)

    def iter_batches(rows):
        return _data.batches(model.module, model.device, source, rows, batch_size)

    def representation(rows):
        parts = [model.module.posterior(x, need_var=False)[0].cpu()
                 for _, x in iter_batches(rows)]
        return torch.cat(parts).numpy()

    with torch.inference_mode():
        return analysis.differential_expression(
            model.module, iter_batches, source.n_cells, model.var_names,
            obs=getattr(data, "obs", None), batch_codes1=codes[0], batch_codes2=codes[1],
            representation_fn=representation, weights=weights,
            importance_weighting_kwargs=importance_weighting_kwargs, **kwargs,
        )


@torch.inference_mode()
def per_cell_losses(model, adata=None, indices=None, batch_size=None):
    """Per-cell reconstruction loss and KL (float64), ``z`` sampled as scvi-tools samples it."""
    recs, kls = [], []
    for _, x in model._iter(adata, indices, batch_size):
        _, _, out = model.module(x, kl_weight=1.0)
        recs.append(out.reconstruction_loss.double().cpu())
        kls.append(out.kl_local.double().cpu())
    rec, kl = torch.cat(recs), torch.cat(kls)
    check_finite(rec.numpy(), "the reconstruction loss")
    check_finite(kl.numpy(), "the KL divergence")
    return rec, kl


def setup_summary(registry, data=None, hide_state_registries: bool = False) -> str:
    """scvi-tools' registry summary as text: summary statistics, where each field is read
    from, and (unless hidden) each categorical field's categories with their codes."""
    n_cells = None
    if data is not None:
        data = open_data(data)
        n_cells = int(getattr(data, "n_cells", None) or data.n_obs)
    stats = [("n_cells", n_cells if n_cells is not None else "?"),
             ("n_vars", len(registry.var_names)), ("n_batch", registry.n_batch),
             ("n_labels", registry.n_labels),
             ("n_extra_categorical_covs", len(registry.categorical_covariate_keys)),
             ("n_extra_continuous_covs", len(registry.continuous_covariate_keys))]
    where = [("X", f"adata.layers['{registry.layer}']" if registry.layer else "adata.X")]
    for field, key in (("batch", registry.batch_key), ("labels", registry.labels_key)):
        where.append((field, f"adata.obs['{key}']" if key else "(none: one category)"))
    where += [("extra_categorical_covs", f"adata.obs[{list(registry.categorical_covariate_keys)}]")
              ] if registry.categorical_covariate_keys else []
    where += [("extra_continuous_covs", f"adata.obs[{list(registry.continuous_covariate_keys)}]")
              ] if registry.continuous_covariate_keys else []
    where += [("size_factor", f"adata.obs['{registry.size_factor_key}']")
              ] if registry.size_factor_key else []
    lines = ["Anndata setup with scvi_fast", "Summary Statistics"]
    lines += [f"  {k:<26} {v}" for k, v in stats]
    lines += ["Data Registry"] + [f"  {k:<26} {v}" for k, v in where]
    if not hide_state_registries:
        for field, key, cats in (("batch", registry.batch_key, registry.batch_categories),
                                 ("labels", registry.labels_key, registry.labels_categories)):
            lines.append(f"{field} State Registry ({'adata.obs[' + repr(key) + ']' if key else 'none'})")
            lines += [f"  {c!s:<26} {i}" for i, c in enumerate(cats)]
        for key, cats in zip(registry.categorical_covariate_keys,
                             registry.categorical_covariate_categories):
            lines.append(f"extra_categorical_covs State Registry (adata.obs[{key!r}])")
            lines += [f"  {c!s:<26} {i}" for i, c in enumerate(cats)]
    return "\n".join(lines)


# ------------------------------------------------------------ likelihood-based --
def likelihood_parameters(model, adata, indices, n_samples, give_mean, batch_size):
    """``get_likelihood_parameters``: ``{"mean", "dispersions"}`` arrays (NB)."""
    return analysis.likelihood_parameters(model.module, model._iter(adata, indices, batch_size),
                                          n_samples=n_samples, give_mean=give_mean)


def marginal_ll(model, adata, indices, n_mc_samples, batch_size, return_mean, **kwargs):
    """``get_marginal_ll``: a float (mean of minibatch means, minibatches of ``batch_size``,
    scvi-tools' 128 by default) or a CPU tensor per cell."""
    unknown = sorted(set(kwargs) - {"n_mc_samples_per_pass"})
    if unknown:
        raise TypeError(f"get_marginal_ll got unexpected arguments {unknown}")
    return analysis.marginal_ll(model.module, model._iter(adata, indices, batch_size or 128),
                                n_mc_samples=n_mc_samples, return_mean=return_mean, **kwargs)


def latent_library_size(model, adata, indices, give_mean, batch_size):
    """``get_latent_library_size``: ``(n_cells, 1)``."""
    return analysis.latent_library_size(model.module, model._iter(adata, indices, batch_size),
                                        give_mean=give_mean)


def feature_correlation_matrix(model, adata, indices, n_samples, batch_size, rna_size_factor,
                               transform_batch, correlation_type, silent):
    """``get_feature_correlation_matrix``: the correlation of denoised samples, averaged over
    the transform batches; a genes x genes DataFrame."""
    if correlation_type not in ("spearman", "pearson"):
        raise ValueError("Unknown correlation type. Choose one of 'spearman', 'pearson'.")
    codes = transform_codes(model.registry, transform_batch)
    it = codes
    if not silent and len(codes) > 1:
        from tqdm.auto import tqdm

        it = tqdm(codes)
    mats = []
    with torch.inference_mode():
        for code in it:
            denoised = analysis.denoised_samples(
                model.module, model._iter(adata, indices, batch_size), n_samples,
                rna_size_factor, code)
            mats.append(analysis.correlation_matrix(denoised, n_samples, correlation_type))
    return pd.DataFrame(np.mean(np.stack(mats), axis=0), index=model.var_names,
                        columns=model.var_names)
