"""Choice of launch configurations: forced > tuned (SCVI_FAST_AUTOTUNE=1, CUDA) > default."""

from __future__ import annotations

import pytest
import torch

from scvi_fast.kernels.triton import _configs

CANDIDATES = [dict(BLOCK=64), dict(BLOCK=128), dict(BLOCK=256)]
CPU = torch.device("cpu")


def test_default_unless_autotune(monkeypatch):
    calls = []
    monkeypatch.delenv("SCVI_FAST_AUTOTUNE", raising=False)
    assert _configs.choose("k", (1,), CANDIDATES, calls.append, CPU) is CANDIDATES[0]
    monkeypatch.setenv("SCVI_FAST_AUTOTUNE", "0")
    assert _configs.choose("k", (1,), CANDIDATES, calls.append, torch.device("cuda", 0)) is \
        CANDIDATES[0]
    # tuning times candidates on a GPU only
    monkeypatch.setenv("SCVI_FAST_AUTOTUNE", "1")
    assert _configs.choose("k", (1,), CANDIDATES, calls.append, CPU) is CANDIDATES[0]
    assert calls == []


def test_forced_wins_and_is_restored(monkeypatch):
    monkeypatch.setenv("SCVI_FAST_AUTOTUNE", "1")
    with _configs.forced("k", CANDIDATES[2]):
        assert _configs.choose("k", (1,), CANDIDATES) == CANDIDATES[2]
        with _configs.forced("k", CANDIDATES[1]):
            assert _configs.choose("k", (1,), CANDIDATES) == CANDIDATES[1]
        assert _configs.choose("k", (1,), CANDIDATES) == CANDIDATES[2]
    assert _configs.choose("k", (1,), CANDIDATES) is CANDIDATES[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tuning times candidates on a GPU")
def test_tuning_picks_the_fastest_and_caches(monkeypatch):
    monkeypatch.setenv("SCVI_FAST_AUTOTUNE", "1")
    x = torch.zeros(1 << 22, device="cuda")
    work = {64: 8, 128: 1, 256: 4}  # the 128 candidate does the least work

    def bench(cfg):
        for _ in range(work[cfg["BLOCK"]]):
            x.add_(1.0)

    key = ("test", 1)
    assert _configs.choose("k", key, CANDIDATES, bench, x.device) == CANDIDATES[1]
    assert _configs.tuned()[("k", key)] == CANDIDATES[1]
