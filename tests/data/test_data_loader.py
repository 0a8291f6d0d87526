"""The block-shuffling loader: coverage, determinism, sharding and exact contents."""

import gc

import numpy as np
import pytest
import scipy.sparse as sp

from scvi_fast.data import BlockShuffleSampler, CSRLoader, CSRMinibatch, as_source, write_h5ad
from _data_helpers import random_counts

LOADER_ARGS = dict(batch_size=64, block_size=8, buffer_size=256)


def _ids(loader):
    return np.concatenate([mb.obs_idx for mb in loader]) if len(loader) else np.zeros(0)


def _check_batch(mb: CSRMinibatch, X: sp.csr_matrix, batch=None):
    ref = X[mb.obs_idx]
    assert mb.indptr.dtype == np.int64 and mb.indices.dtype == np.int32
    assert mb.values.dtype == np.float32 and mb.library.dtype == np.float32
    assert mb.batch.dtype == np.int64 and mb.labels.dtype == np.int64
    assert mb.obs_idx.dtype == np.int64
    np.testing.assert_array_equal(mb.indptr, ref.indptr)
    np.testing.assert_array_equal(mb.indices, ref.indices)
    np.testing.assert_array_equal(mb.values, ref.data)
    np.testing.assert_array_equal(mb.library, np.asarray(ref.sum(axis=1)).ravel())
    assert mb.n_genes == X.shape[1] and mb.n_cells == len(mb.obs_idx)
    if batch is not None:
        np.testing.assert_array_equal(mb.batch, batch[mb.obs_idx])


@pytest.mark.parametrize("n_cells", [1000, 257, 1, 0])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("prefetch", [True, False])
def test_every_cell_once_with_exact_contents(rng, n_cells, shuffle, prefetch):
    X = random_counts(rng, n_cells, 50, density=0.2, empty_rows=3)
    codes = rng.integers(0, 4, size=n_cells)
    loader = CSRLoader(X, shuffle=shuffle, prefetch=prefetch, seed=5, batch_codes=codes,
                       **LOADER_ARGS)
    batches = list(loader)  # collected: earlier minibatches must stay valid
    assert len(batches) == len(loader) == -(-n_cells // 64)
    for mb in batches:
        _check_batch(mb, X, codes)
    ids = _ids(batches)
    if shuffle:
        np.testing.assert_array_equal(np.sort(ids), np.arange(n_cells))
        if n_cells > 64:
            assert not np.array_equal(ids, np.arange(n_cells))
    else:
        np.testing.assert_array_equal(ids, np.arange(n_cells))
    assert all(mb.n_cells == 64 for mb in batches[:-1])


def test_indices_subset_and_order(rng):
    X = random_counts(rng, 500, 30)
    idx = rng.choice(500, size=321, replace=False)
    loader = CSRLoader(X, indices=idx, shuffle=False, **LOADER_ARGS)
    np.testing.assert_array_equal(_ids(loader), idx)
    loader = CSRLoader(X, indices=idx, shuffle=True, **LOADER_ARGS)
    ids = _ids(loader)
    np.testing.assert_array_equal(np.sort(ids), np.sort(idx))
    for mb in loader:
        _check_batch(mb, X)


def test_same_seed_same_order_and_epochs_differ(rng):
    X = random_counts(rng, 700, 20)
    a = CSRLoader(X, seed=11, **LOADER_ARGS)
    b = CSRLoader(X, seed=11, prefetch=False, **LOADER_ARGS)
    np.testing.assert_array_equal(_ids(a), _ids(b))
    np.testing.assert_array_equal(_ids(a), _ids(a))  # iterating again: same epoch, same order
    e0 = _ids(a)
    a.set_epoch(1)
    e1 = _ids(a)
    assert not np.array_equal(e0, e1)
    c = CSRLoader(X, seed=12, **LOADER_ARGS)
    assert not np.array_equal(e0, _ids(c))
    # epoch e of seed s is the order of seed s + e (documented reseeding)
    np.testing.assert_array_equal(e1, _ids(c))


def test_batches_mix_blocks(rng):
    X = random_counts(rng, 4096, 10)
    loader = CSRLoader(X, batch_size=256, block_size=16, buffer_size=2048, seed=0)
    mb = next(iter(loader))
    # a 256-cell batch drawn from a 2048-cell buffer of 16-row blocks touches many blocks
    assert np.unique(mb.obs_idx // 16).size > 40


def _epoch_batches(sampler, epoch):
    """The minibatches (source rows, in emission order) of one epoch of ``sampler``."""
    sampler.set_epoch(epoch)
    order = np.concatenate([rows[perm] for rows, perm in sampler.buffers()])
    return np.split(order, np.arange(sampler.batch_size, order.size, sampler.batch_size))


def _adjacent_same_batch_rate(sampler, n_epochs):
    """How often rows ``i`` and ``i + 1`` (neighbours on disk) share a minibatch, over epochs
    and ``i``; and its expectation under a uniformly random permutation of the rows."""
    n, hits = sampler.n, 0
    for epoch in range(n_epochs):
        batches = _epoch_batches(sampler, epoch)
        where = np.empty(n, dtype=np.int64)
        for b, rows in enumerate(batches):
            where[rows] = b
        assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(n))  # each row once
        hits += int(np.sum(where[1:] == where[:-1]))
    sizes = np.array([len(b) for b in batches], dtype=float)
    expected = float(np.sum(sizes * (sizes - 1)) / (n * (n - 1)))
    return hits / (n_epochs * (n - 1)), expected, n_epochs * (n - 1)


@pytest.mark.parametrize("n, block_size, buffer_size", [
    (1000, 1, 200),  # blocks of one row: a full permutation whatever the buffer
    (200, 32, 256),  # one buffer holds every row: a full permutation whatever the blocks
    (1000, 32, 1024),
])
def test_epoch_order_is_a_uniform_permutation(n, block_size, buffer_size):
    # scvi-tools draws a fresh uniform permutation of the training cells every epoch; rows
    # next to each other on disk (cells sorted by type or batch) must then share a minibatch
    # no more often than any two rows. 6 binomial standard deviations of the pair count.
    s = BlockShuffleSampler(n, batch_size=50 if n == 1000 else 64, block_size=block_size,
                            buffer_size=buffer_size, seed=4)
    rate, expected, trials = _adjacent_same_batch_rate(s, 100)
    assert abs(rate - expected) <= 6 * np.sqrt(expected * (1 - expected) / trials), (rate, expected)


def test_block_shuffle_departs_from_a_permutation_when_buffers_are_smaller():
    # the control of the test above: blocks of 32 rows cut into buffers of 200 keep disk
    # neighbours together (in the same buffer 31 times in 32, then in the same minibatch of
    # 50 with probability 49/199), which the statistic sees
    s = BlockShuffleSampler(1000, batch_size=50, block_size=32, buffer_size=200, seed=4)
    rate, expected, _ = _adjacent_same_batch_rate(s, 20)
    assert expected < 0.05 and rate > 0.2


@pytest.mark.parametrize("world_size", [1, 2])
def test_single_row_blocks_cover_every_row_per_rank(world_size):
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            s = BlockShuffleSampler(1001, batch_size=64, block_size=1, buffer_size=256, seed=9,
                                    rank=rank, world_size=world_size, drop_last=False)
            seen.append(np.concatenate(_epoch_batches(s, epoch)))
            assert len(_epoch_batches(s, epoch)) == len(s)
        allids = np.concatenate(seen)
        assert set(allids.tolist()) == set(range(1001))
        assert allids.size == world_size * -(-1001 // world_size)


def test_block_size_default_follows_where_rows_live(rng, tmp_path):
    from scvi_fast.data import CSRStore
    from scvi_fast.data._loader import DISK_BLOCK_SIZE

    X = random_counts(rng, 300, 20, density=0.5)
    assert CSRLoader(X, batch_size=64).sampler.block_size == 1  # in memory: full permutation
    store = CSRStore.create(tmp_path / "s", X)
    assert CSRLoader(store, batch_size=64).sampler.block_size == DISK_BLOCK_SIZE == 32
    assert CSRLoader(X, batch_size=64, block_size=8).sampler.block_size == 8
    # an in-memory epoch is a permutation of every row, gathered with the right contents
    loader = CSRLoader(X, batch_size=64, buffer_size=128, seed=1)
    for mb in loader:
        _check_batch(mb, X)
    np.testing.assert_array_equal(np.sort(_ids(loader)), np.arange(300))


@pytest.mark.parametrize("n_cells", [1000, 1001, 130])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_two_ranks_shard_each_epoch(rng, n_cells, drop_last, shuffle):
    X = random_counts(rng, n_cells, 15)
    loaders = [CSRLoader(X, rank=r, world_size=2, seed=3, drop_last=drop_last, shuffle=shuffle,
                         **LOADER_ARGS) for r in range(2)]
    for epoch in (0, 1):
        for ld in loaders:
            ld.set_epoch(epoch)
        ids = [_ids(ld) for ld in loaders]
        assert len(loaders[0]) == len(loaders[1])
        assert [len(list(ld)) for ld in loaders] == [len(loaders[0])] * 2
        allids = np.concatenate(ids)
        if not drop_last:
            # everything is seen; padding by wrap-around only when n is odd
            assert set(allids.tolist()) == set(range(n_cells))
            assert allids.size == 2 * -(-n_cells // 2)
            if n_cells % 2 == 0:
                np.testing.assert_array_equal(np.sort(allids), np.arange(n_cells))
        else:
            assert np.unique(allids).size == allids.size  # disjoint, no repeats
            assert all(len(i) % 64 == 0 for i in ids)


def test_drop_last(rng):
    X = random_counts(rng, 200, 10)
    loader = CSRLoader(X, drop_last=True, **LOADER_ARGS)
    assert len(loader) == 3
    assert [mb.n_cells for mb in loader] == [64, 64, 64]


def test_sampler_memory_is_per_buffer():
    s = BlockShuffleSampler(10**8, batch_size=1024, block_size=32, buffer_size=16384)
    rows, perm = next(s.buffers())
    assert rows.size == perm.size == 16384
    assert len(s) == -(-10**8 // 1024)


def test_early_break_and_reiterate(rng):
    X = random_counts(rng, 2000, 10)
    loader = CSRLoader(X, **LOADER_ARGS)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    gc.collect()
    assert len(list(loader)) == len(loader)


def test_errors_propagate_from_prefetch_thread(rng):
    X = random_counts(rng, 300, 10)
    src = as_source(X)

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    src.release = boom
    with pytest.raises(RuntimeError, match="disk on fire"):
        list(CSRLoader(src, **LOADER_ARGS))


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense", "layer", "backed"])
def test_anndata_inputs(rng, tmp_path, fmt):
    import anndata as ad
    import pandas as pd

    X = random_counts(rng, 400, 60)
    obs = pd.DataFrame({"b": pd.Categorical(rng.choice(["x", "y"], 400))},
                       index=[f"c{i}" for i in range(400)])
    if fmt == "csr":
        adata = ad.AnnData(X=X, obs=obs)
    elif fmt == "csc":
        adata = ad.AnnData(X=X.tocsc(), obs=obs)
    elif fmt == "dense":
        adata = ad.AnnData(X=X.toarray(), obs=obs)
    elif fmt == "layer":
        adata = ad.AnnData(X=np.log1p(X), obs=obs, layers={"counts": X})
    else:
        write_h5ad(ad.AnnData(X=X, obs=obs), tmp_path / "a.h5ad")
        adata = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    layer = "counts" if fmt == "layer" else None
    codes = adata.obs["b"].cat.codes.to_numpy()
    loader = CSRLoader(adata, layer=layer, batch_codes=codes, **LOADER_ARGS)
    for mb in loader:
        _check_batch(mb, X, codes.astype(np.int64))
    np.testing.assert_array_equal(np.sort(_ids(loader)), np.arange(400))
    assert loader.var_names.dtype.kind == "U" and loader.n_genes == 60


def test_to_torch_cpu(rng):
    torch = pytest.importorskip("torch")
    X = random_counts(rng, 100, 25)
    mb = next(iter(CSRLoader(X, batch_size=50, shuffle=False)))
    t = mb.to("cpu")
    assert t.indptr.dtype == torch.int64 and t.indices.dtype == torch.int64
    assert t.values.dtype == torch.float32 and t.library.dtype == torch.float32
    assert t.batch.dtype == torch.int64 and t.labels.dtype == torch.int64
    assert t.obs_idx.dtype == torch.int64
    np.testing.assert_array_equal(t.to_dense().numpy(), X[:50].toarray())
    assert mb.to("cpu", indices_dtype=torch.int32).indices.dtype == torch.int32


def test_stream_only_source_is_refused_with_advice():
    from scvi_fast.data import ChunkSource

    src = ChunkSource(lambda c: iter(()), 10, 5)
    with pytest.raises(TypeError, match="CSRStore.create"):
        CSRLoader(src)


def test_held_minibatches_stay_valid_and_buffers_are_recycled(rng):
    X = random_counts(rng, 5000, 40, density=0.3)
    loader = CSRLoader(X, **LOADER_ARGS)  # 20 gather groups, more than the buffer pool
    held = list(loader)
    for mb in held:
        _check_batch(mb, X)
    del held, mb
    bases = set()
    for mb in loader:  # consumed one at a time: a handful of output buffers suffice
        bases.add(id(mb.values.base))
    assert len(bases) <= 6


@pytest.mark.parametrize("stage", [True, False])
@pytest.mark.parametrize("kind", ["memory", "store"])
def test_staged_and_direct_gather_agree(rng, tmp_path, stage, kind):
    from scvi_fast.data import CSRStore

    X = random_counts(rng, 900, 35, density=0.25)
    src = X if kind == "memory" else CSRStore.create(tmp_path / "s", X)
    loader = CSRLoader(src, seed=2, **LOADER_ARGS)
    loader.fetcher.stage_rows = stage
    ids = []
    for mb in loader:
        _check_batch(mb, X)
        ids.append(mb.obs_idx)
    np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(900))


def test_to_cuda_uses_pinned_non_blocking_copies(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    X = random_counts(rng, 300, 25)
    mb = next(iter(CSRLoader(X, batch_size=128, shuffle=False)))
    t = mb.to("cuda")
    torch.cuda.synchronize()
    assert t.values.is_cuda and t.indices.dtype == torch.int64
    np.testing.assert_array_equal(t.to_dense().cpu().numpy(), X[:128].toarray())


def test_duplicate_entries_are_summed(rng, tmp_path):
    from scvi_fast.data import CSRStore

    X = random_counts(rng, 60, 12, density=0.4)
    r = int(np.flatnonzero(np.diff(X.indptr))[0])  # a non-empty row
    e = X.indptr[r + 1]  # append a second entry for its first gene at its end
    indptr = X.indptr.copy()
    indptr[r + 1 :] += 1
    dup = sp.csr_matrix((np.insert(X.data, e, 3.0),
                         np.insert(X.indices, e, X.indices[X.indptr[r]]), indptr), shape=X.shape)
    assert not dup.has_canonical_format
    ref = dup.copy()
    ref.sum_duplicates()
    for src in (dup, CSRStore.create(tmp_path / "s", dup, check=False)):
        mb = next(iter(CSRLoader(src, batch_size=60, shuffle=False)))
        np.testing.assert_array_equal(mb.to_dense(), ref.toarray())
        np.testing.assert_array_equal(mb.indices, ref.indices)
    assert not dup.has_canonical_format  # the caller's matrix is untouched
