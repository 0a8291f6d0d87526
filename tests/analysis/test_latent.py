"""The embedding (``analysis/_latent.py``): bitwise equal to a plain per-batch loop, errors of the
writer thread reach the caller, and host memory does not grow with the number of cells."""

from __future__ import annotations

import errno
import os
import threading
import time

import numpy as np
import pytest
import torch

import scvi_fast
from scvi_fast import functional as F_ops
from scvi_fast.analysis import _latent, _rows, default_batch_size, latent_fn, latent_representation
from scvi_fast.data import CSRLoader, CSRMinibatch, synthetic_anndata, write_synthetic_store

IMPLS = ["torch"] + (["native"] if F_ops._is_available("native") else [])


@pytest.fixture
def adata():
    ad = synthetic_anndata(n_cells=300, n_genes=80, n_batches=3, n_cell_types=3, seed=7)
    scvi_fast.SCVI.setup_anndata(ad, batch_key="batch")
    return ad


def _model(adata, impl="torch", seed=0):
    model = scvi_fast.SCVI(adata, n_hidden=32, n_latent=5, n_layers=2, impl=impl, seed=seed)
    # BatchNorm statistics away from (0, 1), so that eval-mode normalisation is exercised
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _plain_loop(model, adata=None, indices=None, give_mean=True, batch_size=None, return_dist=False):
    """The embedding as a plain loop: every minibatch moved to the device, encoded, copied back."""
    loader = model._loader(model._source(adata), indices=indices, batch_size=batch_size or 1024)
    model.module.eval()
    ms, vs = [], []
    with torch.inference_mode():
        for mb in loader:
            x = mb.to(model.device)
            q_m, q_v = model.module.posterior(x, need_var=return_dist or not give_mean)
            z = q_m if give_mean or return_dist else q_m + torch.sqrt(q_v) * torch.randn_like(q_m)
            ms.append(z.cpu().numpy())
            if return_dist:
                vs.append(q_v.cpu().numpy())
    Z = model.module.n_latent
    m = np.concatenate(ms) if ms else np.zeros((0, Z), np.float32)
    if return_dist:
        return m, (np.concatenate(vs) if vs else np.zeros((0, Z), np.float32))
    return m


# ------------------------------------------------------------------ exactness --
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch_size", [None, 17, 300, 1000])
def test_mean_equals_plain_loop(adata, impl, batch_size):
    model = _model(adata, impl)
    want = _plain_loop(model, batch_size=batch_size)
    got = model.get_latent_representation(batch_size=batch_size)
    assert got.dtype == np.float32 and got.shape == (adata.n_obs, 5)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_sample_return_dist_and_indices_equal_plain_loop(adata, impl):
    model = _model(adata, impl, seed=3)
    torch.manual_seed(5)
    want = _plain_loop(model, give_mean=False, batch_size=64)
    torch.manual_seed(5)
    got = model.get_latent_representation(give_mean=False, batch_size=64)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, model.get_latent_representation(batch_size=64))

    m, v = model.get_latent_representation(return_dist=True, batch_size=41)
    want_m, want_v = _plain_loop(model, return_dist=True, batch_size=41)
    np.testing.assert_array_equal(m, want_m)
    np.testing.assert_array_equal(v, want_v)
    assert (v > 0).all()

    idx = np.random.default_rng(0).permutation(adata.n_obs)[:123]
    got = model.get_latent_representation(indices=idx, batch_size=50)
    np.testing.assert_array_equal(got, _plain_loop(model, indices=idx, batch_size=50))
    np.testing.assert_array_equal(got, model.get_latent_representation()[idx])


def test_out_memmap_equals_in_memory(adata, tmp_path):
    model = _model(adata, "torch", seed=2)
    want = _plain_loop(model, batch_size=70)
    got = model.get_latent_representation(out=tmp_path / "sub" / "z.npy", batch_size=70)
    assert isinstance(got, np.memmap) and not got.flags.writeable
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.load(tmp_path / "sub" / "z.npy"), want)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["z.npy"]
    with pytest.raises(ValueError, match="return_dist"):
        model.get_latent_representation(out=tmp_path / "v.npy", return_dist=True)


def test_zero_cells(adata, tmp_path):
    model = _model(adata)
    z = model.get_latent_representation(indices=[])
    assert z.shape == (0, 5) and z.dtype == np.float32
    m, v = model.get_latent_representation(indices=np.array([], dtype=np.int64), return_dist=True)
    assert m.shape == v.shape == (0, 5)
    zf = model.get_latent_representation(indices=[], out=tmp_path / "z0.npy")
    assert zf.shape == (0, 5) and np.load(tmp_path / "z0.npy").shape == (0, 5)


def test_store_source_and_bf16_ignored_on_cpu(adata, tmp_path):
    from scvi_fast.data import CSRStore

    model = _model(adata, "torch", seed=4)
    store = CSRStore.create(tmp_path / "s.store", adata, batch_key="batch")
    want = _plain_loop(model, adata=store, batch_size=64)
    np.testing.assert_array_equal(model.get_latent_representation(store, batch_size=64), want)
    # bf16 autocast is a CUDA option; on the CPU the result is the fp32 one
    np.testing.assert_array_equal(
        model.get_latent_representation(store, batch_size=64, precision="bf16-mixed"), want)
    with pytest.raises(ValueError, match="precision"):
        model.get_latent_representation(precision="16")


def test_in_order_batches_are_views_of_in_memory_csr(adata, tmp_path):
    import scipy.sparse as sp

    from scvi_fast.analysis import in_order_batches
    from scvi_fast.data import CSRStore, as_source

    src = as_source(adata)
    got = list(in_order_batches(src, 128))
    assert [b.n_cells for b in got] == [128, 128, 44]
    ref = list(CSRLoader(src, batch_size=128, shuffle=False, prefetch=False))
    for a, b in zip(got, ref):
        assert a.indptr.dtype == np.int64 and a.indices.dtype == np.int32
        np.testing.assert_array_equal(a.indptr, b.indptr)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.values, b.values)
        assert np.shares_memory(a.values, src.data) and np.shares_memory(a.indices, src.indices)
    assert list(in_order_batches(as_source(adata[:0].copy()), 128)) == []
    # what the loader would convert (float64 counts) or gather from disk goes through it
    assert in_order_batches(as_source(sp.csr_matrix(adata.X, dtype=np.float64)), 128) is None
    store = CSRStore.create(tmp_path / "s.store", adata, batch_key="batch")
    assert in_order_batches(as_source(store), 128) is None


def test_default_batch_size():
    assert default_batch_size("cpu") == 1024
    assert default_batch_size(torch.device("cuda", 1)) == 16384


# ---------------------------------------------------------------- the pipeline --
def _minibatches(n_batches, rng, n_genes=60, max_rows=40):
    """Host minibatches of varying size and number of non-zeros (some rows empty)."""
    out, obs = [], 0
    for _ in range(n_batches):
        n = int(rng.integers(1, max_rows))
        counts = rng.poisson(0.4, size=(n, n_genes)).astype(np.float32)
        counts[rng.random(n) < 0.1] = 0
        import scipy.sparse as sp

        x = sp.csr_matrix(counts)
        out.append(CSRMinibatch(
            indptr=x.indptr.astype(np.int64), indices=x.indices.astype(np.int32),
            values=x.data.astype(np.float32), batch=np.zeros(n, np.int64),
            labels=np.zeros(n, np.int64), library=counts.sum(1), obs_idx=np.arange(obs, obs + n),
            n_genes=n_genes))
        obs += n
    return out


class _HeldArrays(_latent._Arrays):
    """An in-memory sink whose first write waits until the main thread has taken every output
    slot, so that the device side is certain to run ahead of the writer."""

    writer = None

    def write(self, pos, block):
        if pos == 0:
            deadline = time.monotonic() + 5
            while self.writer.free.qsize() and time.monotonic() < deadline:
                time.sleep(0.001)
        super().write(pos, block)


@pytest.mark.parametrize("copy_inputs", [False, True])
@pytest.mark.parametrize("max_pending", [1, 3])
def test_pipeline_equals_per_batch_and_bounds_blocks_in_flight(copy_inputs, max_pending):
    """Inputs through the reusable (pinned on CUDA) slots or in place, outputs through a bounded
    number of slots: the same rows, in order, and never more than ``max_pending`` in flight."""
    from scvi_fast.module import VAE

    rng = np.random.default_rng(7)
    batches = _minibatches(30, rng)
    n = sum(b.n_cells for b in batches)
    vae = VAE(n_input=60, n_hidden=16, n_latent=4, n_layers=2, impl="torch").eval()
    fn = latent_fn(vae)
    with torch.inference_mode():
        want = np.concatenate([fn(b.to("cpu")).numpy() for b in batches])
    sink = _HeldArrays(n, 4, with_var=False)
    sink.mean.fill(np.nan)
    feed_writer = {}
    real_writer = _latent._Writer

    class Spy(real_writer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            feed_writer["writer"] = sink.writer = self

    real_feed = _latent._HostToDevice

    class FeedSpy(real_feed):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            feed_writer["feed"] = self

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_latent, "_Writer", Spy)
        mp.setattr(_latent, "_HostToDevice", FeedSpy)
        with torch.inference_mode():
            rows = _latent._stream(fn, batches, torch.device("cpu"), sink, max_pending, False, n,
                                   copy_inputs=copy_inputs)
    assert rows == n
    np.testing.assert_array_equal(sink.mean, want)
    writer, feed = feed_writer["writer"], feed_writer["feed"]
    assert writer.max_in_flight == max_pending  # the held sink let the device side run ahead
    assert writer.n_allocs <= max_pending + 2 * max_pending  # slots grow only for larger batches
    if copy_inputs:
        # two slots whose buffers are reused: far fewer allocations than batches x fields
        allocs = sum(s.n_allocs for s in feed.slots)
        assert len(feed.slots) == 2 and allocs < 30 * 3 // 2
    assert not [t for t in threading.enumerate() if t.name == "scvi_fast-latent-writer"]


def test_writer_error_reaches_the_caller_and_leaves_no_file(adata, tmp_path, monkeypatch):
    model = _model(adata)
    calls = {"n": 0}
    real = _rows.NpyFile.write

    def failing(self, pos, block):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, pos, block)

    monkeypatch.setattr(_rows.NpyFile, "write", failing)
    with pytest.raises(OSError, match="No space left"):
        model.get_latent_representation(out=tmp_path / "z.npy", batch_size=20)
    assert calls["n"] == 3  # the main thread stopped feeding once the writer failed
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("scvi_fast-")]


def test_unwritable_out_is_a_clear_error(adata, tmp_path):
    model = _model(adata)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        model.get_latent_representation(out=blocker / "z.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_an_error_in_the_encoder_stops_the_threads(adata, tmp_path, monkeypatch):
    model = _model(adata)
    n = {"calls": 0}
    real = model.module.posterior

    def posterior(x, need_var=True):
        n["calls"] += 1
        if n["calls"] == 4:
            raise RuntimeError("boom")
        return real(x, need_var)

    monkeypatch.setattr(model.module, "posterior", posterior)
    with pytest.raises(RuntimeError, match="boom"):
        model.get_latent_representation(out=tmp_path / "z.npy", batch_size=16)
    assert list(tmp_path.iterdir()) == []
    time.sleep(0.2)  # the loader's threads poll their stop flag every 50 ms
    assert not [t for t in threading.enumerate() if t.name.startswith("scvi_fast-")]


# --------------------------------------------------------------------- memory --
def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_out_keeps_resident_memory_flat(tmp_path):
    """200k cells x 64 latent dimensions into a 51 MB file: resident memory grows by far less
    than the output (the file is appended to, never mapped; buffers are reused)."""
    n_cells, n_latent = 200_000, 64
    store = write_synthetic_store(tmp_path / "big.store", n_cells, n_genes=100, n_batches=2,
                                  density=0.05, seed=1)
    from scvi_fast.module import VAE

    vae = VAE(n_input=100, n_hidden=16, n_latent=n_latent, n_layers=1, impl="torch")
    loader = CSRLoader(store, batch_size=4096, shuffle=False, prefetch=False)
    # a warm-up pass, so that one-time allocations (thread pools, kernel caches) are not counted
    latent_representation(vae, CSRLoader(store, batch_size=4096, shuffle=False, prefetch=False,
                                         indices=np.arange(8192)), 8192, out=tmp_path / "w.npy")
    peak = {"rss": 0.0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], _rss_mb())
            time.sleep(0.001)

    base = _rss_mb()
    t = threading.Thread(target=sample)
    t.start()
    try:
        z = latent_representation(vae, loader, n_cells, out=tmp_path / "z.npy")
    finally:
        stop.set()
        t.join()
    out_mb = n_cells * n_latent * 4 / 2**20
    assert z.shape == (n_cells, n_latent) and np.isfinite(z[-5:]).all()
    growth = peak["rss"] - base
    print(f"resident memory grew by {growth:.1f} MB for a {out_mb:.1f} MB output")
    # loose: the output alone would be ~49 MB; buffers of a 4096-cell batch are well under 10 MB
    assert growth < out_mb / 2, (growth, out_mb)


# ----------------------------------------------------------------------- CUDA --
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the stream pipeline needs CUDA")
@pytest.mark.parametrize("batch_size", [64, None])
def test_cuda_pipeline_equals_plain_loop_and_bf16_is_close(adata, tmp_path, batch_size):
    """Side-stream copies, pinned slots and events change nothing: bitwise the plain loop's
    result on the same device; bf16 autocast stays close to it."""
    model = _model(adata, "auto", seed=6)
    model.device = torch.device("cuda")
    want = _plain_loop(model, batch_size=batch_size or 16384)
    np.testing.assert_array_equal(model.get_latent_representation(batch_size=batch_size), want)
    z = model.get_latent_representation(batch_size=batch_size, out=tmp_path / "z.npy")
    np.testing.assert_array_equal(z, want)
    torch.manual_seed(2)
    want_s = _plain_loop(model, batch_size=batch_size or 16384, give_mean=False)
    torch.manual_seed(2)
    np.testing.assert_array_equal(
        model.get_latent_representation(batch_size=batch_size, give_mean=False), want_s)
    z16 = model.get_latent_representation(batch_size=batch_size, precision="bf16-mixed")
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%); through three GEMMs
    # and two BatchNorms the error stays within a few percent of the values' scale
    scale = float(np.abs(want).max())
    assert np.abs(z16 - want).max() <= 0.05 * scale
    assert not np.array_equal(z16, want)  # bf16 did run
