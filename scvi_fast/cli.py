"""Command line: ``scvi-fast train | embed | convert``.

``scvi-fast train`` with no input trains on a built-in synthetic data set so a
new installation can be checked end to end in a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SYNTHETIC_DEFAULT = {"n_cells": 6000, "n_genes": 2000, "n_batches": 3, "n_cell_types": 6}


def _read_input(path: str, backed: bool = False):
    """An AnnData from ``.h5ad`` (or a CSR store folder, returned as a path)."""
    p = Path(path)
    if p.is_dir():
        return str(p)
    if p.suffix == ".h5ad":
        import anndata

        return anndata.read_h5ad(p, backed="r" if backed else None)
    raise ValueError(f"unsupported input {path!r}: give an .h5ad file or a CSR store folder")


def _cmd_train(args: argparse.Namespace) -> int:
    import scvi_fast
    from scvi_fast.data import synthetic_anndata, write_h5ad
    from scvi_fast.train import _distributed

    # Under torchrun every rank runs this command; rank 0 alone reports and writes.
    ranked = _distributed.env_world_size() > 1
    main = _distributed.is_main_process()
    if not main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this rank
    out = Path(args.out)
    t0 = time.perf_counter()
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
        scvi_fast.SCVI.setup_anndata(adata, batch_key=batch_key, labels_key=labels_key, layer=args.layer)
        model = scvi_fast.SCVI(adata, preset=args.preset, impl=args.impl, **_arch(args))
        n_cells = adata.n_obs
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
    h = model.history_
    t_train = model.trainer.train_time_s
    if main:
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
    print(f"Total {time.perf_counter() - t0:.1f} s")
    return 0


def _arch(args) -> dict:
    return {
        k: v
        for k, v in dict(n_hidden=args.n_hidden, n_latent=args.n_latent, n_layers=args.n_layers).items()
        if v is not None
    }


def _cmd_embed(args: argparse.Namespace) -> int:
    import scvi_fast
    from scvi_fast.data import write_h5ad

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
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix != ".npy":
        adata = data if not isinstance(data, str) else None
        if adata is None:
            raise ValueError("embedding a store: give --out FILE.npy")
        adata = adata.to_memory() if getattr(adata, "isbacked", False) else adata
        adata.obsm["X_scVI"] = latent
        adata.uns.pop(scvi_fast.model.SETUP_KEY, None)
        write_h5ad(adata, out)
    print(f"Embedded {latent.shape[0]} cells in {dt:.1f} s ({latent.shape[0] / max(dt, 1e-9):,.0f} cells/s)")
    print(f"Wrote {out}")
    return 0


def _model_format(path: Path) -> str | None:
    """``"scvi_fast"`` or ``"scvi-tools"`` when ``path`` is a model folder, else None."""
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return "scvi_fast"
    if (path / "model.pt").exists():
        return "scvi-tools"
    return None


def _convert_model(args: argparse.Namespace, source_format: str) -> int:
    import scvi_fast

    target = args.to or ("scvi_fast" if source_format == "scvi-tools" else "scvi-tools")
    model = scvi_fast.SCVI.load(args.input, device="cpu")
    model.save(args.out, overwrite=args.overwrite, format=target)
    print(f"Converted {source_format} model {args.input} -> {target} model {args.out} ({model.summary_string})")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from scvi_fast.data import CSRStore

    source_format = _model_format(Path(args.input))
    if source_format is not None:
        return _convert_model(args, source_format)
    if args.to:
        raise ValueError(f"--to converts model folders; {args.input} is not one")
    genes = None
    if args.genes:
        genes = [g.strip() for g in Path(args.genes).read_text().split() if g.strip()]
    t0 = time.perf_counter()
    store = CSRStore.create(
        args.out, args.input, batch_key=args.batch_key, labels_key=args.labels_key,
        genes=genes, shuffle=args.shuffle,
    )
    print(
        f"Wrote CSR store {args.out}: {store.n_cells} cells x {store.n_genes} genes "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import scvi_fast
    from scvi_fast import metrics

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
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "metrics.csv")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"Wrote {out / 'metrics.csv'} ({time.perf_counter() - t0:.1f} s)")
    if not args.no_plot:
        png = metrics.plot_summary(embeddings, labels, batch, table, out / "metrics.png", seed=args.seed)
        print(f"Wrote {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scvi-fast", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train scVI (no INPUT: a built-in synthetic data set)")
    t.add_argument("input", nargs="?", help=".h5ad file or CSR store folder")
    t.add_argument("--batch-key")
    t.add_argument("--labels-key")
    t.add_argument("--layer")
    t.add_argument("--preset", choices=["census"])
    t.add_argument("--n-hidden", type=int)
    t.add_argument("--n-latent", type=int)
    t.add_argument("--n-layers", type=int)
    t.add_argument("--max-epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--n-cells", type=int, help="size of the synthetic default data set")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--impl", default="auto", choices=["auto", "triton", "native", "torch"])
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    t.add_argument("--nproc-per-node", type=int, default=None,
                   help="data-parallel training in N local processes (one per GPU, or CPU "
                   "shares) through torch's elastic launcher; on clusters run "
                   "`torchrun --nproc-per-node N -m scvi_fast.cli train ...` instead")
    t.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc-per-node: restart failed ranks up to this many times "
                   "(each restart resumes from OUT/checkpoints when --resume is given)")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--out", default="scvi_fast_out", help="output folder (default: scvi_fast_out)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("embed", help="latent representation of new data with a trained model")
    e.add_argument("model", help="model folder (scvi_fast or scvi-tools)")
    e.add_argument("input", help=".h5ad file or CSR store folder")
    e.add_argument("--out", required=True, help="output .h5ad (obsm['X_scVI']) or .npy")
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_cmd_embed)

    c = sub.add_parser(
        "convert",
        help="write a CSR store from .h5ad / 10x / another store, or convert a model folder "
        "between the scvi-tools and scvi_fast formats",
    )
    c.add_argument("input", help="data to store, or a model folder (model.pt or config.json)")
    c.add_argument("--out", required=True)
    c.add_argument("--to", choices=["scvi-tools", "scvi_fast"],
                   help="model format to write (default: the other one)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    c.add_argument("--batch-key")
    c.add_argument("--labels-key")
    c.add_argument("--genes", help="text file with one gene name per line to keep, in order")
    c.add_argument("--shuffle", action="store_true", help="pre-shuffle rows at write time")
    c.set_defaults(func=_cmd_convert)

    v = sub.add_parser("evaluate", help="integration metrics (scib / Census benchmark) of an embedding")
    v.add_argument("input", help="a model folder, or an .h5ad holding the embedding in obsm")
    v.add_argument("--label-key", required=True, help="obs column of cell types (bio conservation)")
    v.add_argument("--batch-key", required=True, help="obs column of batches (batch correction)")
    v.add_argument("--embedding-key", default="X_scVI", help="obsm key when INPUT is an .h5ad")
    v.add_argument("--data", help="with a model folder: the .h5ad of the cells to embed")
    v.add_argument("--max-cells", type=int, default=None, help="evaluate a random subset of cells")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--leiden-iterations", type=int, default=-1,
                   help="Leiden passes per resolution (-1: until stable, as scib; 2 is faster)")
    v.add_argument("--device", default="auto")
    v.add_argument("--no-plot", action="store_true", help="skip the UMAP/metrics PNG")
    v.add_argument("--out", required=True, help="folder for metrics.csv and metrics.png")
    v.set_defaults(func=_cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        print(f"scvi-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
