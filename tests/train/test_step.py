"""The graph-capturable training step, run without capture on the CPU.

On a GPU the step is captured as a CUDA graph and replayed; what a capture records is the step
body run on static buffers. Here that body (``step_mode="static"``: static, padded buffers that
are refilled in place, a device-side KL weight and metric sums) must give the eager step's
numbers exactly, and must contain no operation that would synchronise a GPU with the host.
"""

from __future__ import annotations

import contextlib
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scvi_fast.data import CSRLoader, synthetic_anndata
from scvi_fast.module import VAE
from scvi_fast.train import Trainer
from scvi_fast.train._step import StaticBatches, StepRunner, max_batch_nnz, resolve_step_mode


@pytest.fixture(scope="module")
def adata():
    return synthetic_anndata(n_cells=230, n_genes=61, n_batches=3, n_cell_types=3, density=0.3,
                             seed=11)


#: the covariate model of the covariate tests: two categorical covariates (4 and 2
#: categories), two continuous ones, size factors, encoded and deeply injected
COVARIATE_MODEL = dict(n_cats_per_cov=(4, 2), n_continuous_cov=2, encode_covariates=True,
                       deeply_inject_covariates=True, use_size_factor_key=True)


def _covariate_source(adata):
    from scvi_fast.data import as_source

    rng = np.random.default_rng(1)
    n = adata.n_obs
    return as_source(adata, batch_codes=adata.obs["batch"].cat.codes.to_numpy()).with_covariates(
        cat_covs=np.stack([rng.integers(0, 4, n), rng.integers(0, 2, n)], 1),
        cont_covs=rng.normal(size=(n, 2)), size_factor=rng.uniform(0.5, 2, n))


def _loaders(adata, batch_size=64, covariates=False):
    codes = adata.obs["batch"].cat.codes.to_numpy().astype(np.int64)
    labels = adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    rng = np.random.default_rng(0)
    perm = rng.permutation(adata.n_obs)
    train, val = np.sort(perm[:190]), np.sort(perm[190:])
    kw = dict(batch_codes=codes, labels_codes=labels, prefetch=False)
    data = _covariate_source(adata) if covariates else adata
    return (CSRLoader(data, batch_size=batch_size, shuffle=True, seed=3, indices=train, **kw),
            CSRLoader(data, batch_size=128, shuffle=False, indices=val, **kw))


def _uses_covariates(options: dict) -> bool:
    return bool(options.get("n_cats_per_cov") or options.get("n_continuous_cov"))


def _fit(adata, impl, step_mode, epochs=3, options=None, **kw):
    torch.manual_seed(0)
    options = options or {"gene_likelihood": "nb"}
    module = VAE(adata.n_vars, n_batch=3, n_labels=3, n_hidden=16, n_latent=4, n_layers=2,
                 impl=impl, **options)
    train, val = _loaders(adata, covariates=_uses_covariates(options))
    trainer = Trainer(module, train, val, device="cpu", progress_bar=False, seed=5,
                      n_epochs_kl_warmup=2, step_mode=step_mode, **kw)
    trainer.fit(epochs)
    return trainer


@pytest.mark.parametrize("impl", ["torch", "native"])
def test_static_step_equals_eager(adata, impl):
    """Same parameters, BatchNorm statistics, optimiser state and history, bit for bit: the
    static buffers (padded, refilled in place, smaller minibatches after larger ones) and the
    device-side KL weight change nothing in the arithmetic. 190 training cells at 64 per batch
    leave a last minibatch of 62; the validation pass is one batch of 40."""
    if impl == "native":
        from scvi_fast.kernels import native

        if not native.is_available():
            pytest.skip(f"native extension unavailable: {native.unavailable_reason()}")
    eager = _fit(adata, impl, "eager")
    static = _fit(adata, impl, "static")
    _assert_same_run(eager, static)


def test_static_step_equals_eager_with_covariates(adata):
    """The same with categorical and continuous covariates and size factors: the static
    buffers carry them (``(cells, width)`` slots), and the runs agree bit for bit."""
    eager = _fit(adata, "torch", "eager", options={"gene_likelihood": "nb", **COVARIATE_MODEL})
    static = _fit(adata, "torch", "static", options={"gene_likelihood": "nb", **COVARIATE_MODEL})
    assert set(static._batches.covariates) == {"cat_covs", "cont_covs", "size_factor"}
    _assert_same_run(eager, static)


def _assert_same_run(eager, static):
    assert static.step_mode == "static" and eager.step_mode == "eager"
    assert static._batches.capacity >= max(mb.nnz for mb in static.train_loader)
    for k, v in eager.module.state_dict().items():
        assert torch.equal(v, static.module.state_dict()[k]), k
    assert eager.history == static.history
    s_opt, e_opt = static.optimizer.state_dict()["state"], eager.optimizer.state_dict()["state"]
    for i in e_opt:
        for name in e_opt[i]:
            assert torch.equal(torch.as_tensor(e_opt[i][name]), torch.as_tensor(s_opt[i][name]))


#: every gene likelihood, dispersion, latent distribution and library model at least once
OPTION_SETS = [
    {"gene_likelihood": "zinb"},
    {"gene_likelihood": "poisson", "latent_distribution": "ln"},
    {"gene_likelihood": "nb", "dispersion": "gene-batch", "use_observed_lib_size": False,
     "library_log_means": [[5.0, 5.5, 6.0]], "library_log_vars": [[0.3, 0.5, 0.2]]},
    {"gene_likelihood": "zinb", "dispersion": "gene-label", "latent_distribution": "ln"},
    {"gene_likelihood": "zinb", "dispersion": "gene-cell", "use_observed_lib_size": False,
     "library_log_means": [[5.0, 5.5, 6.0]], "library_log_vars": [[0.3, 0.5, 0.2]]},
    # covariates with the options: the library encoder reads the encoded covariates; with
    # size factors it only adds its KL (the rate reads the size factors)
    {"gene_likelihood": "zinb", "dispersion": "gene-batch", "use_observed_lib_size": False,
     "library_log_means": [[5.0, 5.5, 6.0]], "library_log_vars": [[0.3, 0.5, 0.2]],
     **{**COVARIATE_MODEL, "use_size_factor_key": False}},
    {"gene_likelihood": "poisson", "latent_distribution": "ln", "use_observed_lib_size": False,
     "library_log_means": [[5.0, 5.5, 6.0]], "library_log_vars": [[0.3, 0.5, 0.2]],
     **{**COVARIATE_MODEL, "deeply_inject_covariates": False}},
]


@pytest.mark.parametrize("options", OPTION_SETS,
                         ids=lambda o: "-".join(str(v) for k, v in o.items()
                                                if not k.startswith("library_")))
def test_static_step_equals_eager_every_option(adata, options):
    """The static step gives the eager step's parameters, buffers and history bit for bit for
    every likelihood, dispersion, latent distribution and the library encoder (its noise and
    KL are part of the captured body)."""
    eager = _fit(adata, "torch", "eager", epochs=2, options=options)
    static = _fit(adata, "torch", "static", epochs=2, options=options)
    for k, v in eager.module.state_dict().items():
        assert torch.equal(v, static.module.state_dict()[k]), k
    assert eager.history == static.history
    assert np.isfinite(eager.history["elbo_train"]).all()


def test_static_resume_mid_epoch_equals_uninterrupted(adata, tmp_path, monkeypatch):
    """Mid-epoch checkpoints read the device-side sums; a resumed static run ends equal."""
    full = _fit(adata, "torch", "static")

    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    class Killed(Exception):
        pass

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # 3 steps per epoch: dies in epoch 1
            raise Killed
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", dying_step)
    with pytest.raises(Killed):
        _fit(adata, "torch", "static", checkpoint_dir=tmp_path, checkpoint_every_n_steps=1)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    torch.manual_seed(123)  # the checkpoint's RNG state must win over whatever is current
    module = VAE(adata.n_vars, n_batch=3, n_labels=3, n_hidden=16, n_latent=4, n_layers=2,
                 impl="torch", gene_likelihood="nb")
    train, val = _loaders(adata)
    resumed = Trainer(module, train, val, device="cpu", progress_bar=False, seed=5,
                      n_epochs_kl_warmup=2, step_mode="static", checkpoint_dir=tmp_path,
                      checkpoint_every_n_steps=1)
    resumed.fit(3, resume=True)
    for k, v in full.module.state_dict().items():
        assert torch.equal(v, resumed.module.state_dict()[k]), k
    assert resumed.history["elbo_train"] == pytest.approx(full.history["elbo_train"], rel=1e-12)


# ops that make a CUDA stream wait for the host (or read a device value back)
SYNCING_OPS = ("_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "equal",
               "is_nonzero", "allclose", "_assert_async")


class _NoStepAdam(torch.optim.Adam):
    """Adam whose update is left out of the recording: on CUDA the trainer uses torch's fused,
    ``capturable`` Adam (made for graph capture; it cannot run on the CPU), while the CPU
    update reads its step count back with ``.item()``."""

    recording = None

    def step(self, closure=None):
        rec, _NoStepAdam.recording = _NoStepAdam.recording, None
        try:
            if rec is not None:
                with rec.paused():
                    return super().step(closure)
            return super().step(closure)
        finally:
            _NoStepAdam.recording = rec


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    @contextlib.contextmanager
    def paused(self):
        n = len(self.ops)
        yield
        del self.ops[n:]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__ if hasattr(func, "__name__") else str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("options", [{"gene_likelihood": "nb"}, *OPTION_SETS,
                                     {"gene_likelihood": "nb", **COVARIATE_MODEL}],
                         ids=lambda o: "-".join(str(v) for k, v in o.items()
                                                if not k.startswith("library_")))
def test_step_body_has_no_host_synchronisation(adata, options):
    """The training and evaluation step bodies (what a CUDA graph captures) with the PyTorch
    back-end, for every model option: no op that would synchronise a GPU; the op count per
    step is what a profile of launches starts from. With covariates too (codes offset into
    the stacked tables, continuous terms, log size factors, a library encoder reading them)."""
    torch.manual_seed(0)
    module = VAE(adata.n_vars, n_batch=3, n_labels=3, n_hidden=16, n_latent=4, n_layers=2,
                 impl="torch", **options)
    train, _ = _loaders(adata, covariates=_uses_covariates(options))
    opt = _NoStepAdam(module.parameters(), lr=1e-3, eps=0.01)
    runner = StepRunner(module, module, opt, torch.device("cpu"), mode="static")
    batches = StaticBatches(torch.device("cpu"), 64, max_batch_nnz(train), adata.n_vars)
    mb = next(iter(train))
    slot, x = batches.load(mb)
    runner.run(x, True, slot)  # first step creates Adam's state (outside what is recorded)
    for train_pass in (True, False):
        module.train(train_pass)
        with _RecordOps() as rec:
            _NoStepAdam.recording = rec
            runner.run(x, train_pass, slot)
        bad = [op for op in rec.ops if op.split(".")[0] in SYNCING_OPS]
        assert not bad, f"host-synchronising ops in the {'training' if train_pass else 'eval'} step: {bad}"
        assert len(rec.ops) > 10  # the recorder saw the step


def test_static_batches_copy_and_views(adata):
    """Each load fills the next slot; views cover the minibatch's cells; the padded tail keeps
    whatever was there (a later, smaller minibatch does not clear it)."""
    train, _ = _loaders(adata, batch_size=64)
    mbs = list(train)
    cap = max_batch_nnz(train)
    batches = StaticBatches(torch.device("cpu"), 64, cap, adata.n_vars, n_slots=2)
    for i, mb in enumerate(mbs):
        slot, x = batches.load(mb)
        assert slot == i % 2
        assert x.n_cells == mb.n_cells and x.indices.numel() == cap
        assert torch.equal(x.indptr, torch.from_numpy(mb.indptr))
        assert torch.equal(x.indices[: mb.nnz], torch.from_numpy(mb.indices))
        assert torch.equal(x.values[: mb.nnz], torch.from_numpy(mb.values))
        assert torch.equal(x.batch, torch.from_numpy(np.asarray(mb.batch, dtype=np.int64)))
        assert torch.equal(x.library, torch.from_numpy(mb.library))
        batches.release(slot)
    assert batches.generation == 0


def test_static_batches_carry_covariates(adata):
    train, _ = _loaders(adata, batch_size=64, covariates=True)
    batches = StaticBatches(torch.device("cpu"), 64, max_batch_nnz(train), adata.n_vars)
    for i, mb in enumerate(train):
        slot, x = batches.load(mb)
        for name in ("cat_covs", "cont_covs", "size_factor"):
            assert torch.equal(getattr(x, name), torch.from_numpy(getattr(mb, name))), name
        batches.release(slot)
    # the buffers were laid out once, at the first minibatch
    assert batches.generation == 1 and batches.covariates == {
        "cat_covs": (2,), "cont_covs": (2,), "size_factor": ()}


def test_static_batches_grow_when_a_minibatch_exceeds_capacity(adata):
    train, _ = _loaders(adata)
    mb = next(iter(train))
    batches = StaticBatches(torch.device("cpu"), 8, 5, adata.n_vars)
    _, x = batches.load(mb)
    assert batches.generation == 1 and batches.capacity >= mb.nnz and batches.max_cells >= 64
    assert torch.equal(x.values[: mb.nnz], torch.from_numpy(mb.values))


def test_max_batch_nnz_is_the_sum_of_the_largest_rows(adata):
    train, _ = _loaders(adata, batch_size=64)
    per_row = np.diff(adata.X.indptr)[train.indices]
    assert max_batch_nnz(train) == np.sort(per_row)[-64:].sum()
    assert all(mb.nnz <= max_batch_nnz(train) for mb in train)


def test_step_mode_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_step_mode("auto", cpu) == "eager"
    assert resolve_step_mode("auto", cuda) == "graph"
    assert resolve_step_mode("auto", cuda, distributed=True) == "eager"
    assert resolve_step_mode("auto", cuda, compiled=True) == "eager"
    assert resolve_step_mode("static", cpu) == "static"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_step_mode("graph", cpu)
    with pytest.raises(ValueError, match="step mode must be one of"):
        resolve_step_mode("fast", cpu)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        StepRunner(None, None, None, cpu, mode="graph")


def test_train_cuda_graph_argument_is_checked(adata):
    import scvi_fast

    ad = adata.copy()
    scvi_fast.SCVI.setup_anndata(ad, batch_key="batch")
    model = scvi_fast.SCVI(ad, n_hidden=8, n_latent=3)
    with pytest.raises(ValueError, match="cuda_graph must be None, True or False"):
        model.train(max_epochs=1, cuda_graph="yes", device="cpu", progress_bar=False)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        model.train(max_epochs=1, cuda_graph=True, device="cpu", progress_bar=False)


def test_non_finite_loss_stops_training_with_the_weights_before_it(adata, tmp_path):
    """Counts broken after setup (NaN in one cell) stop training at the first minibatch that
    holds the cell, naming epoch and step; that step's update is skipped (fused Adam's
    found_inf), so the weights are those of the step before, and the epoch-0 checkpoint is
    kept."""
    from scvi_fast.train import NonFiniteError

    bad = adata.copy()
    train, val = _loaders(bad)
    victim = int(train.indices[5])
    row = slice(bad.X.indptr[victim], bad.X.indptr[victim + 1])
    bad.X.data[row] = np.nan
    # the loaders read the matrix directly: build them after the damage
    train, val = _loaders(bad)
    torch.manual_seed(0)
    module = VAE(bad.n_vars, n_batch=3, n_hidden=16, n_latent=4, n_layers=2, impl="torch")
    snapshots = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *a, **k):
        snapshots.append({n: p.detach().clone() for n, p in module.named_parameters()})
        return real_step(self, *a, **k)

    trainer = Trainer(module, train, val, device="cpu", progress_bar=False, seed=5,
                      step_mode="static", checkpoint_dir=tmp_path)
    torch.optim.Adam.step = recording_step
    try:
        with pytest.raises(NonFiniteError, match=r"not finite at epoch 0, step \d+ of 3") as err:
            trainer.fit(2)
    finally:
        torch.optim.Adam.step = real_step
    assert "no checkpoint was written" in str(err.value) and "counts changed" in str(err.value)
    # the failing step is the last one recorded; its update was skipped
    for n, p in module.named_parameters():
        assert torch.equal(p.detach(), snapshots[-1][n]), n
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("n_train, batch_size, match", [
    (0, 64, "no cells to train on"),
    (1, 64, "last minibatch of 1 cell; add cells"),
    (129, 64, "last minibatch of 1 cell; change batch_size"),
])
def test_degenerate_training_sets_are_refused_before_training(adata, n_train, batch_size, match):
    codes = adata.obs["batch"].cat.codes.to_numpy().astype(np.int64)
    loader = CSRLoader(adata, batch_size=batch_size, indices=np.arange(n_train),
                       batch_codes=codes, prefetch=False)
    module = VAE(adata.n_vars, n_batch=3, n_hidden=8, n_latent=2, impl="torch")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        Trainer(module, loader, None, device="cpu", progress_bar=False)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_static_step_equals_eager_with_scvi_tools_plan_options(adata):
    """The per-step KL warm-up (a device scalar refilled before each step), AdamW, the plateau
    scheduler (rate changes between steps) and a query model's gradient hooks and eval mode
    leave the static step body equal to the eager step, bit for bit."""
    from scvi_fast.module import set_online_update

    def fit(step_mode, query):
        torch.manual_seed(0)
        module = VAE(adata.n_vars, n_batch=3, n_hidden=16, n_latent=4, n_layers=2, impl="torch")
        if query:
            set_online_update(module)
        train, val = _loaders(adata)
        trainer = Trainer(module, train, val, device="cpu", progress_bar=False, seed=5,
                          n_epochs_kl_warmup=None, n_steps_kl_warmup=7, min_kl_weight=0.1,
                          optimizer="AdamW", reduce_lr_on_plateau=True, lr_patience=0,
                          lr_threshold=1e9, step_mode=step_mode)
        trainer.fit(3)
        return trainer

    for query in (False, True):
        eager, static = fit("eager", query), fit("static", query)
        for k, v in eager.module.state_dict().items():
            assert torch.equal(v, static.module.state_dict()[k]), (query, k)
        assert eager.history == static.history
        assert eager.history["lr-AdamW"] == [1e-3, 1e-3, 6e-4]  # the rate did change (x0.6)
        assert eager.history["kl_weight"][0] == pytest.approx(0.1 + 0.9 * 2 / 7)  # last step 2
