"""The capturable training step with the Triton back-end (what a CUDA graph records on a GPU):
no host-synchronising op, and the static-buffer step gives the eager step's numbers."""

from __future__ import annotations

import contextlib
import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scvi_fast.data import CSRLoader, synthetic_anndata
from scvi_fast.module import VAE
from scvi_fast.train import Trainer
from scvi_fast.train._step import StaticBatches, StepRunner, max_batch_nnz

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
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _setup(device, batch_size=16):
    ad = synthetic_anndata(n_cells=40, n_genes=37, n_batches=3, n_cell_types=2, density=0.3,
                           seed=5)
    codes = ad.obs["batch"].cat.codes.to_numpy().astype(np.int64)
    loader = CSRLoader(ad, batch_size=batch_size, shuffle=True, seed=1, batch_codes=codes,
                       prefetch=False)
    torch.manual_seed(0)
    module = VAE(ad.n_vars, n_batch=3, n_hidden=8, n_latent=3, n_layers=2,
                 impl="triton").to(device)
    return ad, loader, module


def test_triton_step_body_has_no_host_synchronisation(device):
    ad, loader, module = _setup(device)
    opt = _NoStepAdam(module.parameters(), lr=1e-3, eps=0.01)
    runner = StepRunner(module, module, opt, device, mode="static")
    batches = StaticBatches(device, 16, max_batch_nnz(loader), ad.n_vars)
    slot, x = batches.load(next(iter(loader)))
    runner.run(x, True, slot)  # Adam's state and kernel compilation happen here
    for train in (True, False):
        module.train(train)
        with _RecordOps() as rec:
            _NoStepAdam.recording = rec
            runner.run(x, train, slot)
        bad = [op for op in rec.ops if op.split(".")[0] in SYNCING_OPS]
        assert not bad, f"host-synchronising ops ({'train' if train else 'eval'}): {bad}"


def test_triton_static_step_equals_eager(device):
    """Two epochs of 40 cells at 16 per batch (a last batch of 8). On the CPU (interpreter)
    bitwise; on a GPU, atomics-based sums differ in rounding only (1e-5 relative)."""
    histories, states = [], []
    for mode in ("eager", "static"):
        _, loader, module = _setup(device)
        trainer = Trainer(module, loader, None, device=device, progress_bar=False,
                          step_mode=mode, n_epochs_kl_warmup=2)
        trainer.fit(2)
        histories.append(trainer.history["elbo_train"])
        states.append({k: v.detach().cpu() for k, v in module.state_dict().items()})
    exact = device.type == "cpu"
    np.testing.assert_allclose(histories[1], histories[0], rtol=0 if exact else 1e-5)
    for k, v in states[0].items():
        if exact:
            assert torch.equal(v, states[1][k]), k
        else:
            torch.testing.assert_close(states[1][k], v, rtol=1e-4, atol=1e-5)
