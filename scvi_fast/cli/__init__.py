"""Command line: ``scvi-fast train | embed | convert | evaluate``.

``scvi-fast train`` with no input trains on a built-in synthetic data set so a
new installation can be checked end to end in a few minutes on a laptop CPU.

Every mistake in a command line (a size that is not positive, an unknown or absent device, a
missing input, an output that exists without ``--overwrite`` or cannot be written) is found
before any work starts and ends the command with exit status 2 and one line on stderr;
``--overwrite`` replaces only a store or model folder scvi_fast wrote, never anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from scvi_fast.cli._checks import (
    UsageError,
    _device,
    _existing,
    _is_file,
    _is_model,
    _leiden_iterations,
    _model_format,
    _non_negative,
    _Parser,
    _positive,
    _positive_float,
    _read_input,
    _replaceable,
    _writable_folder,
)

SYNTHETIC_DEFAULT = {"n_cells": 6000, "n_genes": 2000, "n_batches": 3, "n_cell_types": 6}


def _covariate_setup(args) -> dict:
    """``setup_anndata``'s covariate arguments given on the command line."""
    return {k: v for k, v in dict(
        categorical_covariate_keys=args.categorical_covariate_keys,
        continuous_covariate_keys=args.continuous_covariate_keys,
        size_factor_key=args.size_factor_key).items() if v}


def _check_train(args) -> None:
    _existing(args.input)
    if args.input is not None:
        p = Path(args.input)
        if not (p.is_dir() or p.suffix == ".h5ad"):
            raise UsageError(f"unsupported input {args.input!r}: give an .h5ad file or a CSR "
                             "store folder")
        if p.is_dir() and _covariate_setup(args):
            raise UsageError("--categorical-covariate-keys, --continuous-covariate-keys and "
                             "--size-factor-key need an .h5ad input (a CSR store records only "
                             "its batch and labels)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    data_out = "X_scVI.npy" if args.input is not None and Path(args.input).is_dir() else "adata_scvi.h5ad"
    found = [p for p in (out / "model", out / data_out, out / "checkpoints" / "checkpoint.pt")
             if p.exists()]
    if found and not (args.overwrite or args.resume):
        raise UsageError(f"{out} holds the output of an earlier run "
                         f"({', '.join(str(p.relative_to(out)) for p in found)}); pass --resume to "
                         "continue it or --overwrite to replace it")
    _replaceable(out / "model", True, _is_model, "model folder")
    _replaceable(out / data_out, True, _is_file, "file")
    _writable_folder(out, "--out")


def _train_inputs(args):
    """``(data, model, n_cells)`` of ``scvi-fast train``: the input (or the built-in synthetic
    data set) set up with the command's keys, and the untrained model on it."""
    import scvi_fast
    from scvi_fast.data import synthetic_anndata

    if args.input is None:
        cfg = dict(SYNTHETIC_DEFAULT)
        if args.n_cells:
            cfg["n_cells"] = args.n_cells
        print(
            f"No input given: generating synthetic counts ({cfg['n_cells']} cells x "
            f"{cfg['n_genes']} genes, {cfg['n_batches']} batches, {cfg['n_cell_types']} cell types)."
        )
        adata = synthetic_anndata(seed=args.seed, **cfg)
        if args.max_epochs is None:
            # the validation ELBO of this data set levels off well before scvi-tools'
            # 400-epoch heuristic; keep the out-of-the-box check to about a minute
            args.max_epochs = 100
        batch_key = args.batch_key or "batch"
        labels_key = args.labels_key or "cell_type"
    else:
        adata = _read_input(args.input)
        batch_key, labels_key = args.batch_key, args.labels_key
    if isinstance(adata, str):
        model = scvi_fast.SCVI(adata, preset=args.preset, impl=args.impl, **_arch(args))
        n_cells = model._source().n_cells
    else:
        scvi_fast.SCVI.setup_anndata(adata, batch_key=batch_key, labels_key=labels_key,
                                     layer=args.layer, **_covariate_setup(args))
        model = scvi_fast.SCVI(adata, preset=args.preset, impl=args.impl, **_arch(args))
        n_cells = adata.n_obs
    return adata, model, n_cells


def _report(model, latent, written) -> None:
    """What ``scvi-fast train`` prints once done."""
    import scvi_fast

    h, t_train = model.history_, model.trainer.train_time_s
    msg = (
        f"Trained {len(h['elbo_train'])} epochs in {t_train:.1f} s "
        f"({model.trainer.cells_trained / max(t_train, 1e-9):,.0f} cells/s, "
        f"back-end {scvi_fast.functional.resolve_impl(model.module.impl, model.device)}, "
        f"device {model.device}); final ELBO per cell: train {h['elbo_train'][-1]:.2f}"
    )
    if "elbo_validation" in h:
        msg += f", validation {h['elbo_validation'][-1]:.2f}"
    print(msg)
    print(f"Latent representation: {latent.shape[0]} x {latent.shape[1]} (obsm['X_scVI'])")
    for w in written:
        print(f"Wrote {w}")


def _cmd_train(args: argparse.Namespace) -> int:
    import scvi_fast
    from scvi_fast.data import write_h5ad
    from scvi_fast.train import _distributed

    # Under torchrun every rank runs this command; rank 0 alone reports and writes.
    ranked = _distributed.env_world_size() > 1
    main = _distributed.is_main_process()
    if not main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this rank
    _check_train(args)
    out = Path(args.out)
    t0 = time.perf_counter()
    adata, model, n_cells = _train_inputs(args)
    print(f"{model.summary_string}; {n_cells} cells")
    train_kwargs = {
        k: v
        for k, v in dict(max_epochs=args.max_epochs, batch_size=args.batch_size, lr=args.lr).items()
        if v is not None
    }
    model.train(
        seed=args.seed, device=args.device, checkpoint_dir=out / "checkpoints",
        resume=args.resume, progress_bar=not args.quiet, **train_kwargs,
        strategy="ddp" if ranked or args.nproc_per_node else "auto",
        devices=args.nproc_per_node or "auto", max_restarts=args.max_restarts,
    )
    if main:
        _replaceable(out / "model", True, _is_model, "model folder")  # again, just before
        model.save(out / "model", overwrite=True)
    # a store's embedding is written straight into X_scVI.npy (each rank its rows under torchrun)
    latent = model.get_latent_representation(out=out / "X_scVI.npy" if isinstance(adata, str) else None)
    if not main:
        return 0
    written = [out / "model"]
    if not isinstance(adata, str):
        adata.obsm["X_scVI"] = latent
        adata.uns.pop(scvi_fast.model.SETUP_KEY, None)
        write_h5ad(adata, out / "adata_scvi.h5ad")
        written.append(out / "adata_scvi.h5ad")
    else:
        written.append(out / "X_scVI.npy")
    _report(model, latent, written)
    print(f"Total {time.perf_counter() - t0:.1f} s")
    return 0


def _arch(args) -> dict:
    given = dict(n_hidden=args.n_hidden, n_latent=args.n_latent, n_layers=args.n_layers,
                 gene_likelihood=args.gene_likelihood, dispersion=args.dispersion,
                 latent_distribution=args.latent_distribution,
                 encode_covariates=args.encode_covariates or None)
    if args.no_observed_lib_size:
        given["use_observed_lib_size"] = False
    return {k: v for k, v in given.items() if v is not None}


def _check_embed(args) -> None:
    _existing(args.model, "model folder")
    if _model_format(Path(args.model)) is None:
        raise UsageError(f"{args.model} is not a model folder (scvi_fast: config.json and "
                         "model.safetensors; scvi-tools: model.pt)")
    _existing(args.input)
    out = Path(args.out)
    if out.suffix not in (".h5ad", ".npy"):
        raise UsageError(f"--out {out}: give a .h5ad file (obsm['X_scVI']) or a .npy file")
    if Path(args.input).is_dir() and out.suffix != ".npy":
        raise UsageError("embedding a store: give --out FILE.npy")
    _replaceable(out, args.overwrite, _is_file, "file")
    _writable_folder(out.parent, "--out")


def _cmd_embed(args: argparse.Namespace) -> int:
    import scvi_fast
    from scvi_fast.data import write_h5ad

    _check_embed(args)
    model = scvi_fast.SCVI.load(args.model, device=args.device)
    out = Path(args.out)
    # Streaming to .npy reads a backed .h5ad (or a store) chunk by chunk: memory stays bounded.
    data = _read_input(args.input, backed=out.suffix == ".npy")
    t0 = time.perf_counter()
    latent = model.get_latent_representation(
        data, batch_size=args.batch_size, out=out if out.suffix == ".npy" else None,
        progress_bar=not args.quiet,
    )
    dt = time.perf_counter() - t0
    if out.suffix != ".npy":
        adata = data.to_memory() if getattr(data, "isbacked", False) else data
        adata.obsm["X_scVI"] = latent
        adata.uns.pop(scvi_fast.model.SETUP_KEY, None)
        write_h5ad(adata, out)
    print(f"Embedded {latent.shape[0]} cells in {dt:.1f} s ({latent.shape[0] / max(dt, 1e-9):,.0f} cells/s)")
    print(f"Wrote {out}")
    return 0


def _convert_model(args: argparse.Namespace, source_format: str) -> int:
    import scvi_fast

    target = args.to or ("scvi_fast" if source_format == "scvi-tools" else "scvi-tools")
    model = scvi_fast.SCVI.load(args.input, device="cpu")
    _replaceable(Path(args.out), args.overwrite, _is_model, "model folder")  # again, just before
    model.save(args.out, overwrite=args.overwrite, format=target)
    print(f"Converted {source_format} model {args.input} -> {target} model {args.out} ({model.summary_string})")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from scvi_fast.data import CSRStore, is_store

    _existing(args.input)
    _existing(args.genes, "--genes file")
    out = Path(args.out)
    source_format = _model_format(Path(args.input))
    if source_format is not None:
        _replaceable(out, args.overwrite, _is_model, "model folder")
        _writable_folder(out.parent, "--out")
        return _convert_model(args, source_format)
    if args.to:
        raise UsageError(f"--to converts model folders; {args.input} is not one")
    _replaceable(out, args.overwrite, is_store, "CSR store")
    _writable_folder(out.parent, "--out")
    genes = None
    if args.genes:
        genes = [g.strip() for g in Path(args.genes).read_text().split() if g.strip()]
    t0 = time.perf_counter()
    store = CSRStore.create(
        args.out, args.input, batch_key=args.batch_key, labels_key=args.labels_key,
        genes=genes, shuffle=args.shuffle, overwrite=args.overwrite,
    )
    print(
        f"Wrote CSR store {args.out}: {store.n_cells} cells x {store.n_genes} genes "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _check_evaluate(args) -> None:
    _existing(args.input)
    _existing(args.data, "--data")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    found = [p.name for p in (out / "metrics.csv", out / "metrics.png") if p.exists()]
    if found and not args.overwrite:
        raise UsageError(f"{out} holds {', '.join(found)} already; pass --overwrite to replace")
    _writable_folder(out, "--out")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import scvi_fast
    from scvi_fast import metrics

    _check_evaluate(args)
    src = Path(args.input)
    if src.is_dir():
        data = _read_input(args.data) if args.data else None
        model = scvi_fast.SCVI.load(src, adata=data, device=args.device)
        adata = model.adata
        if adata is None or not hasattr(adata, "obs"):
            raise ValueError("the model folder holds no AnnData: pass --data H5AD with its cells")
        embeddings = {"scvi_fast": model.get_latent_representation()}
    else:
        adata = _read_input(args.input)
        if args.embedding_key not in adata.obsm:
            raise KeyError(f"obsm[{args.embedding_key!r}] not found; available: {list(adata.obsm)}")
        embeddings = {args.embedding_key: adata.obsm[args.embedding_key]}
    for key in (args.label_key, args.batch_key):
        if key not in adata.obs:
            raise KeyError(f"{key!r} is not a column of obs: {list(adata.obs.columns)[:20]}")
    labels, batch = adata.obs[args.label_key].to_numpy(), adata.obs[args.batch_key].to_numpy()
    t0 = time.perf_counter()
    table = metrics.summary_table(embeddings, labels, batch, max_cells=args.max_cells, seed=args.seed,
                                  leiden_iterations=args.leiden_iterations)
    out = Path(args.out)
    table.to_csv(out / "metrics.csv")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"Wrote {out / 'metrics.csv'} ({time.perf_counter() - t0:.1f} s)")
    if not args.no_plot:
        png = metrics.plot_summary(embeddings, labels, batch, table, out / "metrics.png", seed=args.seed)
        print(f"Wrote {png}")
    return 0


def _add_train(sub, device_help) -> None:
    """The ``train`` command's arguments."""
    t = sub.add_parser("train", help="train scVI (no INPUT: a built-in synthetic data set)")
    t.add_argument("input", nargs="?", help=".h5ad file or CSR store folder")
    t.add_argument("--batch-key", help="obs column of the batches (an .h5ad input)")
    t.add_argument("--labels-key", help="obs column of the cell labels (an .h5ad input)")
    t.add_argument("--layer", help="AnnData layer holding the counts (default: X)")
    t.add_argument("--categorical-covariate-keys", nargs="+", metavar="KEY",
                   help="obs columns of extra categorical covariates (an .h5ad input)")
    t.add_argument("--continuous-covariate-keys", nargs="+", metavar="KEY",
                   help="numeric obs columns of continuous covariates (an .h5ad input)")
    t.add_argument("--size-factor-key",
                   help="positive obs column of size factors; its log replaces the observed "
                        "log library (an .h5ad input)")
    t.add_argument("--encode-covariates", action="store_true",
                   help="feed the batch and covariates to the encoder too")
    t.add_argument("--preset", choices=["census"],
                   help="census: the CZ CELLxGENE Census recipe (NB likelihood, 512 hidden, "
                   "50 latent, 2 layers, lr 1e-4, batch 1024, 100 epochs)")
    t.add_argument("--n-hidden", type=_positive, help="hidden units per layer (default 128)")
    t.add_argument("--n-latent", type=_positive, help="latent dimensions (default 10)")
    t.add_argument("--n-layers", type=_positive, help="hidden layers (default 1)")
    t.add_argument("--gene-likelihood", choices=["zinb", "nb", "poisson"],
                   help="gene likelihood (default zinb, as scvi-tools; nb with --preset census)")
    t.add_argument("--dispersion", choices=["gene", "gene-batch", "gene-label", "gene-cell"],
                   help="what the NB / ZINB dispersion depends on (default gene)")
    t.add_argument("--latent-distribution", choices=["normal", "ln"],
                   help="normal (default) or ln (logistic normal)")
    t.add_argument("--no-observed-lib-size", action="store_true",
                   help="model the library size with an encoder and a per-batch prior "
                   "(scvi-tools' use_observed_lib_size=False) instead of the observed totals")
    t.add_argument("--max-epochs", type=_positive,
                   help="epochs to train (default: scvi-tools' rule by data size; 100 for the "
                   "synthetic data)")
    t.add_argument("--batch-size", type=_positive, help="cells per minibatch (default 128)")
    t.add_argument("--lr", type=_positive_float, help="learning rate (default 1e-3)")
    t.add_argument("--n-cells", type=_positive, help="size of the synthetic default data set")
    t.add_argument("--seed", type=_non_negative, default=0,
                   help="seed of the split, the shuffle and the initialisation (default 0)")
    t.add_argument("--device", type=_device, default="auto", help=device_help)
    t.add_argument("--impl", default="auto", choices=["auto", "triton", "native", "torch"],
                   help="back-end of the fused ops (default: the fastest available)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in OUT (model, embedding, "
                   "checkpoint)")
    t.add_argument("--nproc-per-node", type=_positive, default=None,
                   help="data-parallel training in N local processes (one per GPU, or CPU "
                   "shares) through torch's elastic launcher; on clusters run "
                   "`torchrun --nproc-per-node N -m scvi_fast.cli train ...` instead")
    t.add_argument("--max-restarts", type=_non_negative, default=0,
                   help="with --nproc-per-node: restart failed ranks up to this many times "
                   "(each restart resumes from OUT/checkpoints when --resume is given)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--out", default="scvi_fast_out", help="output folder (default: scvi_fast_out)")
    t.set_defaults(func=_cmd_train)


def _add_embed(sub, device_help) -> None:
    """The ``embed`` command's arguments."""
    e = sub.add_parser("embed", help="latent representation of new data with a trained model")
    e.add_argument("model", help="model folder (scvi_fast or scvi-tools)")
    e.add_argument("input", help=".h5ad file or CSR store folder")
    e.add_argument("--out", required=True, help="output .h5ad (obsm['X_scVI']) or .npy")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    e.add_argument("--batch-size", type=_positive, default=None,
                   help="cells per minibatch (default: by device)")
    e.add_argument("--device", type=_device, default="auto", help=device_help)
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_embed)


def _add_convert(sub) -> None:
    """The ``convert`` command's arguments."""
    c = sub.add_parser(
        "convert",
        help="write a CSR store from .h5ad / 10x / another store, or convert a model folder "
        "between the scvi-tools and scvi_fast formats",
    )
    c.add_argument("input", help="data to store, or a model folder (model.pt or config.json)")
    c.add_argument("--out", required=True, help="the store or model folder to write")
    c.add_argument("--to", choices=["scvi-tools", "scvi_fast"],
                   help="model format to write (default: the other one)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing store (or model folder) at --out; never anything "
                   "else")
    c.add_argument("--batch-key", help="obs column stored as the batch codes")
    c.add_argument("--labels-key", help="obs column stored as the label codes")
    c.add_argument("--genes", help="text file with one gene name per line to keep, in order")
    c.add_argument("--shuffle", action="store_true", help="pre-shuffle rows at write time")
    c.set_defaults(func=_cmd_convert)


def _add_evaluate(sub, device_help) -> None:
    """The ``evaluate`` command's arguments."""
    v = sub.add_parser("evaluate", help="integration metrics (scib / Census benchmark) of an embedding")
    v.add_argument("input", help="a model folder, or an .h5ad holding the embedding in obsm")
    v.add_argument("--label-key", required=True, help="obs column of cell types (bio conservation)")
    v.add_argument("--batch-key", required=True, help="obs column of batches (batch correction)")
    v.add_argument("--embedding-key", default="X_scVI", help="obsm key when INPUT is an .h5ad")
    v.add_argument("--data", help="with a model folder: the .h5ad of the cells to embed")
    v.add_argument("--max-cells", type=_positive, default=None,
                   help="evaluate a random subset of cells")
    v.add_argument("--seed", type=_non_negative, default=0, help="seed of the subset and UMAP")
    v.add_argument("--leiden-iterations", type=_leiden_iterations, default=-1,
                   help="Leiden passes per resolution (-1: until stable, as scib; 2 is faster)")
    v.add_argument("--device", type=_device, default="auto", help=device_help)
    v.add_argument("--no-plot", action="store_true", help="skip the UMAP/metrics PNG")
    v.add_argument("--out", required=True, help="folder for metrics.csv and metrics.png")
    v.add_argument("--overwrite", action="store_true",
                   help="replace metrics.csv and metrics.png in --out")
    v.set_defaults(func=_cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    from scvi_fast import __version__

    p = _Parser(prog="scvi-fast", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print the version of scvi_fast and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="train, embed, convert or evaluate")
    device_help = ("auto (a CUDA GPU when present, else the CPU), cpu, cuda, cuda:N or mps "
                   "(default: auto)")

    _add_train(sub, device_help)
    _add_embed(sub, device_help)
    _add_convert(sub)
    _add_evaluate(sub, device_help)
    return p


def _one_line(err: BaseException) -> str:
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(msg).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``scvi-fast`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a bad command line (one line printed)
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    from scvi_fast.train import CheckpointError, NonFiniteError

    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, OSError, NotImplementedError, CheckpointError,
            NonFiniteError) as err:
        print(f"scvi-fast {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


