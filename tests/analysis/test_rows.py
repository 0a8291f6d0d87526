"""The one ``.npy`` writer: rows written at their place, by one or several processes, renamed
into place only when complete."""

from __future__ import annotations

import numpy as np
import pytest

from scvi_fast.analysis import NpyFile, map_rows


def test_writers_fill_their_ranges_in_any_order(tmp_path):
    rng = np.random.default_rng(0)
    want = rng.standard_normal((37, 5)).astype(np.float32)
    out = tmp_path / "sub" / "z.npy"
    NpyFile(out, 37, 5).close()  # what rank 0 does first
    a, b = NpyFile(out, 37, 5, create=False), NpyFile(out, 37, 5, create=False)
    b.write(19, want[19:30])
    a.write(0, want[:19])
    b.write(30, want[30:])
    a.close()
    assert not out.exists()  # nothing in place until finished
    got = b.finish()
    np.testing.assert_array_equal(got, want)
    assert [p.name for p in out.parent.iterdir()] == ["z.npy"]


def test_bad_blocks_and_discard(tmp_path):
    f = NpyFile(tmp_path / "z.npy", 4, 3)
    with pytest.raises(RuntimeError, match="does not fit"):
        f.write(3, np.zeros((2, 3), np.float32))
    with pytest.raises(RuntimeError, match="does not fit"):
        f.write(0, np.zeros((1, 4), np.float32))
    f.discard()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=".npy"):
        NpyFile(tmp_path / "z.txt", 4, 3)


def test_map_rows_without_a_job(tmp_path):
    import torch

    rows = np.array([4, 0, 7, 2], dtype=np.int64)

    class MB:
        def __init__(self, idx):
            self.idx = idx

        def to(self, device, non_blocking=True):
            return torch.as_tensor(self.idx, dtype=torch.float32).reshape(-1, 1).repeat(1, 2)

    def make_loader(idx):
        return [MB(idx[:3]), MB(idx[3:])]

    def fn(x):
        return x * 10

    want = np.repeat(rows[:, None] * 10.0, 2, axis=1)
    np.testing.assert_array_equal(map_rows(fn, make_loader, rows, 2, "cpu"), want)
    got = map_rows(fn, make_loader, rows, 2, "cpu", out=tmp_path / "z.npy")
    np.testing.assert_array_equal(got, want)
