"""Nothing damaged is used silently: checksums, structure, confinement, overwrite, leftovers.

Damage is made the way it happens (bytes flipped in a file, an entry moved, a manifest
edited); every case must end in a :class:`StoreCorruptError` that names the file (and the chunk
and cells where there is one), before a damaged row reaches a minibatch.
"""

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from scvi_fast.data import CSRLoader, CSRStore, StoreCorruptError, is_store
from scvi_fast.data._atomic import LEGACY_AGE_S, clean_stale
from scvi_fast.data._checksum import crc32c, crc32c_numba
from scvi_fast.data._store_checks import manifest_crc
from _data_helpers import random_counts

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_convert_worker.py")


def _counts(rng, n_cells=900, n_genes=300):
    X = random_counts(rng, n_cells, n_genes, density=0.1, max_count=300)
    ones = sp.csr_matrix((np.ones(n_cells, np.float32), (np.arange(n_cells),
                          np.zeros(n_cells, int))), shape=X.shape)
    return sp.csr_matrix(X + ones)  # no empty cells


def _store(rng, tmp_path, name="s", **kw):
    X = _counts(rng)
    codes = rng.integers(0, 3, X.shape[0])
    from scvi_fast.data import ArraySource

    src = ArraySource.from_matrix(X, batch_codes=codes)
    src.batch_categories = ["a", "b", "c"]
    return X, CSRStore.create(tmp_path / name, src, **kw), tmp_path / name


def _flip(path: Path, at: int, n: int = 8) -> None:
    raw = bytearray(path.read_bytes())
    for k in range(n):
        raw[at + k] ^= 0xFF
    path.write_bytes(bytes(raw))


def _edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    if "manifest_crc32" in m:  # a consistent edit: the checks below must not rely on this one
        m["manifest_crc32"] = manifest_crc(m)
    (path / "manifest.json").write_text(json.dumps(m))


# ------------------------------------------------------------------ checksums ---
def test_crc32c_matches_the_standard_and_continues(rng):
    assert crc32c(b"123456789") == 0xE3069283 == crc32c_numba(np.frombuffer(b"123456789", np.uint8))
    for n in (0, 1, 7, 8, 9, 4097):
        a = rng.integers(0, 256, n, dtype=np.uint8)
        k = n // 3
        assert crc32c(a) == crc32c_numba(a) == crc32c(a[k:], crc32c(a[:k]))
        assert crc32c_numba(a[k:], crc32c_numba(a[:k])) == crc32c(a)


@pytest.mark.parametrize("chunk_rows", [1, 5, 256])
def test_chunk_checksums_cover_every_byte_through_upcasts(rng, tmp_path, chunk_rows):
    from scvi_fast.data import StoreWriter

    X = _counts(rng, 203, 40)
    X.data[-1] = 70000  # a late chunk upcasts data from uint16 to uint32
    X.data[X.indptr[7] : X.indptr[8]] = 0  # an empty cell (check=False lets it in)
    X.eliminate_zeros()
    w = StoreWriter(tmp_path / "s", 40, [str(i) for i in range(40)], check=False,
                    chunk_rows=chunk_rows)
    with w:
        for a in range(0, 203, 7):
            w.add(X[a : a + 7])
        store = w.close()
    assert store.data.dtype == np.uint32 and store.chunk_rows == chunk_rows
    ip = store.indptr
    for name in ("indices", "data"):
        arr = getattr(store, name)
        crcs = np.fromfile(tmp_path / "s" / f"{name}_crc32c.bin", dtype=np.uint32)
        bounds = np.append(ip[::chunk_rows], ip[-1]) if 203 % chunk_rows else ip[::chunk_rows]
        assert crcs.size == -(-203 // chunk_rows)
        want = [crc32c_numba(arr[bounds[c] : bounds[c + 1]]) for c in range(crcs.size)]
        np.testing.assert_array_equal(crcs, want)
    CSRStore.open(tmp_path / "s", verify=True)
    assert (store.to_scipy() != X).nnz == 0


def test_empty_store_opens_and_verifies(tmp_path):
    store = CSRStore.create(tmp_path / "s", sp.csr_matrix((0, 5), dtype=np.float32))
    assert store.n_cells == 0 and store._chunks.checked.size == 0
    CSRStore.open(tmp_path / "s", verify=True).verify()


@pytest.mark.parametrize("name", ["data.bin", "indices.bin"])
@pytest.mark.parametrize("stage", [None, False], ids=["staged", "mapped"])
def test_flipped_counts_fail_before_a_minibatch(rng, tmp_path, name, stage):
    X, _, path = _store(rng, tmp_path)
    size = (path / name).stat().st_size
    _flip(path / name, size // 2)
    store = CSRStore.open(path)  # opening reads no counts
    got = []
    with pytest.raises(StoreCorruptError, match=rf"{name}: chunk \d+ \(cells \d+-\d+, bytes "
                                                r"\d+-\d+\) fails its CRC-32C checksum.*"
                                                r"Re-create the store"):
        for mb in CSRLoader(store, batch_size=50, stage=stage, block_size=4, buffer_size=100):
            got.append(mb.obs_idx.copy())
            assert (mb.to_scipy() != X[mb.obs_idx]).nnz == 0  # what did arrive is intact
    with pytest.raises(StoreCorruptError, match=name):
        CSRStore.open(path).to_scipy()
    with pytest.raises(StoreCorruptError, match=name):
        CSRStore.open(path, verify=True)


def test_a_chunk_is_checked_once_and_the_first_epoch_checks_all(rng, tmp_path, monkeypatch):
    X, store, _ = _store(rng, tmp_path)
    calls = []
    real = store._chunks._check_run
    monkeypatch.setattr(store._chunks, "_check_run", lambda a, b: (calls.append((a, b)), real(a, b)))
    for _ in range(2):
        for mb in CSRLoader(store, batch_size=64, block_size=8, buffer_size=128):
            assert (mb.to_scipy() != X[mb.obs_idx]).nnz == 0
    checked = np.concatenate([np.arange(a, b) for a, b in calls])
    np.testing.assert_array_equal(np.sort(checked), np.arange(store._chunks.checked.size))
    assert store._chunks.n_unchecked == 0


def test_checks_can_be_turned_off(rng, tmp_path):
    X, _, path = _store(rng, tmp_path)
    _flip(path / "data.bin", (path / "data.bin").stat().st_size // 2)
    store = CSRStore.open(path, check_reads=False)
    assert (store.to_scipy() != X).nnz > 0  # unchecked, damaged counts come through


# ------------------------------------------------------------ structure on open --
def test_moved_indptr_entry_is_refused_on_open(rng, tmp_path):
    _, store, path = _store(rng, tmp_path)
    ip = np.fromfile(path / "indptr.bin", dtype=np.int64)
    ip[50] += 1  # still rising, still in range: only the checksum sees it
    assert np.all(np.diff(ip) >= 0)
    ip.tofile(path / "indptr.bin")
    with pytest.raises(StoreCorruptError, match=r"indptr.bin fails its CRC-32 checksum"):
        CSRStore.open(path)


@pytest.mark.parametrize("value", [2, 77])
def test_damaged_batch_code_is_refused_on_open(rng, tmp_path, value):
    _, store, path = _store(rng, tmp_path)
    codes = np.fromfile(path / "batch.bin", dtype=np.int32)
    codes[123] = value if codes[123] != value else 1
    codes.tofile(path / "batch.bin")
    with pytest.raises(StoreCorruptError, match="batch.bin fails its CRC-32 checksum"):
        CSRStore.open(path)


def test_structure_is_checked_even_with_consistent_checksums(rng, tmp_path):
    _, _, path = _store(rng, tmp_path)
    codes = np.fromfile(path / "batch.bin", dtype=np.int32)
    codes[10] = 9
    codes.tofile(path / "batch.bin")
    _edit_manifest(path, lambda m: m["arrays"]["batch"].update(crc32=zlib.crc32(codes.tobytes())))
    with pytest.raises(StoreCorruptError, match=r"batch code 9 of cell 10 is outside \[0, 3\)"):
        CSRStore.open(path)


def test_manifest_edits_are_refused(rng, tmp_path):
    _, _, path = _store(rng, tmp_path)
    m = json.loads((path / "manifest.json").read_text())
    m["batch_categories"][0] = "z"
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreCorruptError, match="manifest.json fails its checksum"):
        CSRStore.open(path)


@pytest.mark.parametrize("name", ["../../../../etc/hostname", "/etc/hostname", "..", "link.bin"])
def test_manifest_files_stay_inside_the_store(rng, tmp_path, name):
    _, _, path = _store(rng, tmp_path)
    outside = tmp_path / "outside.bin"
    shutil.copy(path / "labels.bin", outside)
    (path / "link.bin").symlink_to(outside)
    _edit_manifest(path, lambda m: m["arrays"]["labels"].update(file=name))
    with pytest.raises(StoreCorruptError, match="inside the store folder|outside the store"):
        CSRStore.open(path)


def test_gene_index_beyond_n_genes_is_refused_when_written(rng, tmp_path):
    X = _counts(rng, 20, 10)
    bad = sp.csr_matrix((X.data, X.indices, X.indptr), shape=(20, 10))
    bad.indices[5] = 12  # scipy does not check this
    with pytest.raises(ValueError, match=r"gene indices outside \[0, 10\)"):
        CSRStore.create(tmp_path / "s", bad)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------- older stores --
def _strip_to_old_format(path: Path) -> None:
    m = json.loads((path / "manifest.json").read_text())
    for k in ("chunk_rows", "chunk_checksum", "files", "manifest_crc32"):
        m.pop(k)
    for k in ("indices_crc32c", "data_crc32c"):
        (path / m["arrays"].pop(k)["file"]).unlink()
    (path / "manifest.json").write_text(json.dumps(m))


def test_store_without_chunk_checksums_opens_with_a_warning(rng, tmp_path):
    X, _, path = _store(rng, tmp_path)
    _strip_to_old_format(path)
    with pytest.warns(UserWarning, match="no chunk checksums.*re-convert") as rec:
        store = CSRStore.open(path)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    assert (store.to_scipy() != X).nnz == 0
    # its gene indices are still checked as read, its files with verify=True
    idx = np.fromfile(path / "indices.bin", dtype=store.indices.dtype)
    idx[len(idx) // 2] = 299 + 1
    idx.tofile(path / "indices.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(StoreCorruptError, match=r"gene index 300 of cell \d+ .* not below"):
            CSRStore.open(path).to_scipy()
        with pytest.raises(StoreCorruptError, match="indices.bin fails its CRC-32 checksum"):
            CSRStore.open(path, verify=True)


# ------------------------------------------------------------------ overwrite --
def test_overwrite_replaces_only_a_store(rng, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "important.txt").write_text("keep")
    X = _counts(rng, 30, 20)
    with pytest.raises(FileExistsError, match="not a CSR store.*Nothing was deleted"):
        CSRStore.create(folder, X, overwrite=True)
    assert (folder / "important.txt").read_text() == "keep"
    (tmp_path / "file").write_text("keep")
    with pytest.raises(FileExistsError, match="not a CSR store"):
        CSRStore.create(tmp_path / "file", X, overwrite=True)
    assert is_store(CSRStore.create(tmp_path / "s", X).path)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        CSRStore.create(tmp_path / "s", X[:10])
    assert CSRStore.create(tmp_path / "s", X[:10], overwrite=True).n_cells == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "results", "s"]


# --------------------------------------------------- killed and racing writers --
def _worker(dest, marker, seed, n_chunks, go="-"):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(WORKER), str(dest), str(marker), str(seed),
                             str(n_chunks), str(go)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc, timeout=60.0):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker ended early: {proc.communicate()}")
        if time.time() - t0 > timeout:
            raise AssertionError("worker did not start")
        time.sleep(0.05)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_killed_conversion_is_cleaned_up_by_the_next(rng, tmp_path):
    proc = _worker(tmp_path / "s", tmp_path / "started", 1, 5, go=tmp_path / "never")
    _wait_for(tmp_path / "started", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = _hidden(tmp_path)
    assert any(n.endswith(".lock") for n in left) and any(".tmp" in n for n in left), left
    assert not (tmp_path / "s").exists()
    CSRStore.create(tmp_path / "s", _counts(rng, 20, 10))
    assert _hidden(tmp_path) == []


def test_racing_conversions_keep_each_others_work(tmp_path):
    slow = _worker(tmp_path / "s", tmp_path / "slow", 1, 12, go=tmp_path / "go")
    _wait_for(tmp_path / "slow", slow)
    fast = _worker(tmp_path / "s", tmp_path / "fast", 2, 2)
    out_fast, err_fast = fast.communicate(timeout=120)
    assert fast.returncode == 0, err_fast
    assert any(".tmp" in n for n in _hidden(tmp_path))  # the slow one's work is still there
    (tmp_path / "go").touch()
    out_slow, err_slow = slow.communicate(timeout=120)
    assert slow.returncode == 0, err_slow
    assert int(out_fast) == 100 and int(out_slow) == 600
    store = CSRStore.open(tmp_path / "s", verify=True)
    assert store.n_cells == 600  # the last to finish replaced the first
    assert _hidden(tmp_path) == []


def test_leftovers_of_older_versions_go_once_a_day_old(tmp_path):
    dest = tmp_path / "s"
    old, young = tmp_path / ".s.tmp-0123456789ab", tmp_path / ".s.stage-ba9876543210"
    trash = tmp_path / ".s.old-aaaaaaaaaaaa"
    for p in (old, young, trash):
        p.mkdir()
    stale = time.time() - LEGACY_AGE_S - 60
    os.utime(old, (stale, stale))
    os.utime(trash, (stale, stale))
    (tmp_path / ".other.tmp-0123456789ab").mkdir()
    removed = clean_stale(dest)
    # an old ".old" entry may hold the only copy of a store whose swap was cut short
    assert removed == [old]
    assert _hidden(tmp_path) == [".other.tmp-0123456789ab", ".s.old-aaaaaaaaaaaa",
                                 ".s.stage-ba9876543210"]
    dest.mkdir()
    assert clean_stale(dest) == [trash]


# ------------------------------------------------------------ several readers --
def _read_all(path: str, seed: int, queue) -> None:
    try:
        store = CSRStore.open(path)
        digest = []
        for mb in CSRLoader(store, batch_size=64, seed=seed, block_size=8, buffer_size=256):
            digest.append(zlib.crc32(mb.obs_idx.tobytes() + mb.indices.tobytes()
                                     + mb.values.tobytes() + mb.batch.tobytes()))
        queue.put(("ok", digest, int(store._chunks.n_unchecked)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        queue.put(("error", repr(err), -1))


def test_readers_in_several_processes_agree(rng, tmp_path):
    """The data-parallel case: processes reading one store at once see the same minibatches,
    and checking it concurrently never reports damage that is not there."""
    _, _, path = _store(rng, tmp_path)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_read_all, args=(str(path), 3, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r[0] == "ok" for r in results), results
    local = ctx.Queue()
    _read_all(str(path), 3, local)
    ref = local.get()
    assert all(r[1] == ref[1] and r[2] == 0 for r in results)
