"""The registry: what a model was set up with (genes, covariate keys and categories, layer).

One frozen :class:`Registry` per model, made from an AnnData's setup, a CSR store or a saved
model, and the one place where data is coded into the model's categories
(:meth:`Registry.codes_for`, on :func:`scvi_fast.data.codes_for`). Decided once for every
input:

* categories are the ``str`` form of the values, in category order, without the categories
  no cell uses (:func:`scvi_fast.data.categorize`): an AnnData and a CSR store of the same
  cells get the same categories;
* a value the model does not know is an error, for batches and labels alike, from an AnnData
  or a store; a missing batch column is an error, a missing labels column codes every cell 0
  (scVI's NB likelihood does not read labels);
* extra categorical covariates (``categorical_covariate_keys``) are coded like the batch, each
  in its own recorded categories; continuous covariates and size factors are float columns
  (finite; size factors positive);
* ``transform_batch`` / ``batchid`` values are category names (matched by their ``str`` form,
  as scvi-tools matches them to its mapping), never positions.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np

from scvi_fast import data as _data

#: where ``setup_anndata`` records the setup in ``adata.uns``
SETUP_KEY = "_scvi_fast_setup"
#: the single category of a model without that covariate (scvi-tools' ``[0]``)
NO_CATEGORIES = ("0",)

Field = Literal["batch", "labels"]


@dataclass(frozen=True)
class Registry:
    """A model's setup: gene names, covariate keys and their categories, the counts' layer.

    Keys are None when a covariate is absent; its categories are then ``("0",)``.
    ``categorical_covariate_categories`` holds one tuple of categories per key of
    ``categorical_covariate_keys``.
    """

    var_names: tuple[str, ...]
    batch_key: str | None = None
    batch_categories: tuple[str, ...] = NO_CATEGORIES
    labels_key: str | None = None
    labels_categories: tuple[str, ...] = NO_CATEGORIES
    layer: str | None = None
    categorical_covariate_keys: tuple[str, ...] = ()
    categorical_covariate_categories: tuple[tuple[str, ...], ...] = ()
    continuous_covariate_keys: tuple[str, ...] = ()
    size_factor_key: str | None = None

    # ---------------------------------------------------------------- making one --
    @classmethod
    def from_setup(cls, adata, batch_key: str | None = None, labels_key: str | None = None,
                   layer: str | None = None, categorical_covariate_keys=None,
                   continuous_covariate_keys=None, size_factor_key: str | None = None) -> Registry:
        """The registry ``setup_anndata`` records: keys checked, categories coded, the
        continuous columns and size factors checked."""
        cat_keys = _key_list(categorical_covariate_keys, "categorical_covariate_keys")
        cont_keys = _key_list(continuous_covariate_keys, "continuous_covariate_keys")
        for key, what in ((batch_key, "batch_key"), (labels_key, "labels_key"),
                          *((k, "categorical_covariate_keys") for k in cat_keys),
                          *((k, "continuous_covariate_keys") for k in cont_keys),
                          (size_factor_key, "size_factor_key")):
            if key is not None and key not in adata.obs:
                raise KeyError(
                    f"{what}={key!r} is not a column of adata.obs; available: "
                    f"{list(adata.obs.columns)[:20]}"
                )
        if layer is not None and layer not in adata.layers:
            raise KeyError(f"layer={layer!r} is not in adata.layers: {list(adata.layers)}")

        def categories(key):
            return tuple(_data.categorize(adata.obs[key], key)[1]) if key else NO_CATEGORIES

        registry = cls(var_names=_names(adata.var_names), batch_key=batch_key,
                       batch_categories=categories(batch_key), labels_key=labels_key,
                       labels_categories=categories(labels_key), layer=layer,
                       categorical_covariate_keys=cat_keys,
                       categorical_covariate_categories=tuple(categories(k) for k in cat_keys),
                       continuous_covariate_keys=cont_keys, size_factor_key=size_factor_key)
        registry.covariates_of(adata)  # checks the float columns now, before any training
        return registry

    @classmethod
    def from_anndata(cls, adata) -> Registry:
        """The registry an AnnData was set up with (``adata.uns`` after ``setup_anndata``)."""
        if SETUP_KEY not in adata.uns:
            raise ValueError(
                "this AnnData is not set up: call scvi_fast.SCVI.setup_anndata(adata, "
                "batch_key=...) first"
            )
        return cls.from_dict({**adata.uns[SETUP_KEY], "var_names": _names(adata.var_names)})

    @classmethod
    def from_store(cls, store) -> Registry:
        """The registry of a CSR store: the covariates recorded when it was written."""

        def categories(key):
            if key is None:
                return NO_CATEGORIES
            return tuple(_data.categorize(store.obs_column(key), key)[1])

        return cls(var_names=_names(store.var_names), batch_key=store.batch_key,
                   batch_categories=categories(store.batch_key), labels_key=store.labels_key,
                   labels_categories=categories(store.labels_key))

    @classmethod
    def from_data(cls, data) -> Registry:
        """:meth:`from_store` for a store (or its path), else :meth:`from_anndata`."""
        data = open_data(data)
        return cls.from_store(data) if isinstance(data, _data.CSRStore) else cls.from_anndata(data)

    # ----------------------------------------------------------- saved as a dict --
    def to_dict(self) -> dict:
        """JSON-ready: keys and layer as strings (``""`` when absent), lists for tuples."""
        out = asdict(self)
        for key in ("batch_key", "labels_key", "layer", "size_factor_key"):
            out[key] = out[key] or ""
        return {k: _lists(v) for k, v in out.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Registry:
        """Read any registry dict this package has written: ``config.json``'s ``"registry"``
        (with or without the covariate fields), ``adata.uns`` setups and the scvi-tools
        import's. Unknown entries (e.g. the old ``"source"``) are ignored."""

        def key(name):
            v = d.get(name)
            return str(v) if v not in (None, "") else None

        def names(v, default=()):
            return tuple(str(c) for c in v) if v is not None and len(v) else default

        return cls(
            var_names=names(d.get("var_names")),
            batch_key=key("batch_key"),
            batch_categories=names(d.get("batch_categories"), NO_CATEGORIES),
            labels_key=key("labels_key"),
            labels_categories=names(d.get("labels_categories"), NO_CATEGORIES),
            layer=key("layer"),
            categorical_covariate_keys=names(d.get("categorical_covariate_keys")),
            categorical_covariate_categories=_per_key(
                d.get("categorical_covariate_categories"), names(d.get("categorical_covariate_keys")),
                names),
            continuous_covariate_keys=names(d.get("continuous_covariate_keys")),
            size_factor_key=key("size_factor_key"),
        )

    def write_setup(self, adata) -> None:
        """Record this setup in ``adata.uns`` (what ``setup_anndata`` leaves behind)."""
        d = self.to_dict()
        keys = ["batch_key", "labels_key", "layer", "batch_categories", "labels_categories"]
        if self.has_covariates:  # (a setup without them keeps its earlier, smaller record)
            keys += ["categorical_covariate_keys", "categorical_covariate_categories",
                     "continuous_covariate_keys", "size_factor_key"]
        setup = {k: d[k] for k in keys}
        if self.has_covariates:  # ragged lists do not fit in an .h5ad: one entry per key
            setup["categorical_covariate_categories"] = dict(zip(
                self.categorical_covariate_keys, d["categorical_covariate_categories"]))
        adata.uns[SETUP_KEY] = setup

    # --------------------------------------------------------------------- coding --
    def key_of(self, which: Field) -> str | None:
        return self.batch_key if which == "batch" else self.labels_key

    def categories_of(self, which: Field) -> tuple[str, ...]:
        return self.batch_categories if which == "batch" else self.labels_categories

    def codes_for(self, values, key: Field,
                  unknown: Literal["error", "missing"] = "error") -> np.ndarray:
        """Codes of ``values`` in this model's ``key`` categories (``"batch"`` or ``"labels"``).

        Matched by ``str`` form; with ``unknown="error"`` a value the model does not know is an
        error, with ``"missing"`` it gets code -1. See :func:`scvi_fast.data.codes_for`.
        """
        if key not in ("batch", "labels"):
            raise ValueError(f"key must be 'batch' or 'labels'; got {key!r}")
        return _data.codes_for(values, self.categories_of(key), self.key_of(key) or key,
                               unknown=unknown)

    def codes_of(self, data, which: Field) -> np.ndarray | None:
        """Every cell's ``which`` code in this model's categories; None: all zeros.

        ``data`` is an AnnData or a :class:`~scvi_fast.data.CSRStore`; a store's column is its
        recorded covariate of that kind (whatever its name).
        """
        key = self.key_of(which)
        if key is None:
            return None
        if isinstance(data, _data.CSRStore):
            store_key = data.batch_key if which == "batch" else data.labels_key
            column = None if store_key is None else data.obs_column(store_key)
        else:
            column = data.obs[key] if key in data.obs else None
        if column is None:
            if which == "labels":
                return None
            raise KeyError(f"the model was trained with batch_key={key!r}, which this data "
                           "does not have (an obs column, or a store's batch)")
        return self.codes_for(column, which)

    @property
    def has_covariates(self) -> bool:
        """Whether minibatches carry extra covariates or size factors for this model."""
        return bool(self.categorical_covariate_keys or self.continuous_covariate_keys
                    or self.size_factor_key)

    def covariates_of(self, data) -> dict:
        """Every cell's extra covariates as a :class:`~scvi_fast.data.Source` takes them
        (:meth:`~scvi_fast.data.Source.with_covariates`): ``cat_covs`` ``(n, n_cat)`` codes in
        the recorded categories (unknown values refused), ``cont_covs`` ``(n, n_cont)`` and
        ``size_factor`` ``(n,)``; None where the model has none.

        ``data`` is an AnnData; a CSR store records only its batch and labels, so a model with
        covariates refuses one.
        """
        if not self.has_covariates:
            return {"cat_covs": None, "cont_covs": None, "size_factor": None}
        if isinstance(data, _data.CSRStore):
            raise ValueError(
                "this model was set up with covariates or size factors "
                f"({self._covariate_summary()}), which a CSR store does not record (it keeps "
                "the batch and labels only); train and embed from the AnnData instead")
        obs = data.obs
        for key in (*self.categorical_covariate_keys, *self.continuous_covariate_keys,
                    *([self.size_factor_key] if self.size_factor_key else [])):
            if key not in obs:
                raise KeyError(f"the model was set up with obs column {key!r}, which this data "
                               "does not have")
        cat = cont = sf = None
        if self.categorical_covariate_keys:
            cat = np.stack([_data.codes_for(obs[k], cats, k) for k, cats in zip(
                self.categorical_covariate_keys, self.categorical_covariate_categories)], 1)
        if self.continuous_covariate_keys:
            cont = np.stack([_float_column(obs[k], k) for k in self.continuous_covariate_keys], 1)
        if self.size_factor_key:
            sf = _float_column(obs[self.size_factor_key], self.size_factor_key)
            if not (sf > 0).all():
                raise ValueError(f"obs[{self.size_factor_key!r}] holds size factors <= 0 (first "
                                 f"at cell {int(np.argmax(~(sf > 0)))}); the library is their log")
        return {"cat_covs": cat, "cont_covs": cont, "size_factor": sf}

    def _covariate_summary(self) -> str:
        return ", ".join(f"{what}={v!r}" for what, v in (
            ("categorical_covariate_keys", list(self.categorical_covariate_keys)),
            ("continuous_covariate_keys", list(self.continuous_covariate_keys)),
            ("size_factor_key", self.size_factor_key)) if v)

    @property
    def n_cats_per_cov(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.categorical_covariate_categories)

    def check_genes(self, var_names) -> None:
        """Refuse data whose genes are not the model's, in the model's order."""
        theirs = _names(var_names)
        if theirs == self.var_names:
            return
        shared = len(set(theirs) & set(self.var_names))
        same = shared == len(self.var_names) == len(theirs)
        raise ValueError(
            f"the data's genes differ from the model's: {len(theirs)} genes given, "
            f"{len(self.var_names)} in the model, {shared} in common"
            + (" (same genes, different order)" if same else "")
            + ". Reorder/subset with adata[:, model.var_names] or "
            "SCVI.prepare_query_anndata(adata, model)."
        )

    def extended_by(self, adata) -> Registry:
        """This registry with the categories ``adata`` adds after the known ones (query data)."""

        def extended(which: Field) -> tuple[str, ...]:
            key = self.key_of(which)
            known = self.categories_of(which)
            if key is None or key not in adata.obs:
                return known
            present = _data.categorize(adata.obs[key], key)[1]
            seen = set(known)
            return known + tuple(c for c in present if c not in seen)

        def extended_covariate(key, known):
            if key not in adata.obs:
                return known
            seen = set(known)
            present = _data.categorize(adata.obs[key], key)[1]
            return known + tuple(c for c in present if c not in seen)

        return replace(self, batch_categories=extended("batch"),
                       labels_categories=extended("labels"),
                       categorical_covariate_categories=tuple(
                           extended_covariate(k, c) for k, c in zip(
                               self.categorical_covariate_keys,
                               self.categorical_covariate_categories)))

    @property
    def n_batch(self) -> int:
        return len(self.batch_categories)

    @property
    def n_labels(self) -> int:
        return len(self.labels_categories)


def open_data(data):
    """A path becomes the CSR store it names; anything else is returned as it is."""
    if isinstance(data, (str, os.PathLike)):
        return _data.CSRStore.open(data)
    return data


def _per_key(categories, keys, names) -> tuple[tuple[str, ...], ...]:
    """Categories per categorical covariate, from a list of lists (``config.json``) or a dict
    keyed by covariate (``adata.uns``, where ragged lists cannot be written)."""
    if categories is None or len(categories) == 0:
        return ()
    if isinstance(categories, dict):
        return tuple(names(categories[k]) for k in keys)
    return tuple(names(c) for c in categories)


def _key_list(keys, what: str) -> tuple[str, ...]:
    """``categorical_covariate_keys`` etc. as a tuple of distinct column names."""
    if keys is None:
        return ()
    if isinstance(keys, str):
        raise TypeError(f"{what} must be a list of obs columns, e.g. [{keys!r}]; got a string")
    keys = tuple(str(k) for k in keys)
    if len(set(keys)) != len(keys):
        raise ValueError(f"{what} repeats a column: {list(keys)}")
    return keys


def _float_column(values, key: str) -> np.ndarray:
    """A numeric obs column as float32, refusing text, missing and infinite values."""
    import pandas as pd

    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        raise TypeError(f"obs[{key!r}] must be numeric to be a continuous covariate or size "
                        f"factor; it is {getattr(values, 'dtype', type(values))}")
    a = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"obs[{key!r}] has {int(bad.sum())} missing or infinite values (first "
                         f"at cell {int(np.argmax(bad))}); fill or drop those cells")
    return a.astype(np.float32)


def _names(values) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


def _lists(v):
    return [_lists(x) for x in v] if isinstance(v, (tuple, list)) else v


__all__ = ["NO_CATEGORIES", "Registry", "SETUP_KEY", "open_data"]
