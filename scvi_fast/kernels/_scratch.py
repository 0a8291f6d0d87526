"""Reusable scratch tensors for the large per-step intermediates of the CPU path.

A training step at the Census shape produces two ``B x G`` float32 tensors (the decoder
logits and the logit gradient of the likelihood, 33 MB each at 1024 x 8000). On the CPU,
allocations of that size are served by ``mmap`` and every fresh one pays a page fault per
4 KiB page on first touch (about 10 ms per tensor on a 2-core machine, as much as the
kernel that fills it). Ops that own such a tensor for the whole of its life take it from
this pool and give it back when they are done with it, so the same pages are reused step
after step.

Only buffers that never escape to the caller are pooled: a buffer is given back only by
the op that took it, once nothing else refers to it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class ScratchPool:
    """Free tensors by ``(shape, dtype, device)``, at most ``per_key`` of each, ``max_keys`` keys.

    ``take`` returns a pooled tensor (uninitialised contents) or a new one; ``give`` returns
    it. The least recently used shapes are dropped first, so a changing last-batch size
    cannot make the pool grow.
    """

    def __init__(self, per_key: int = 2, max_keys: int = 4):
        self.per_key, self.max_keys = per_key, max_keys
        self._free: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(shape, dtype, device) -> tuple:
        return (tuple(int(s) for s in shape), dtype, torch.device(device))

    def take(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        key = self._key(shape, dtype, device)
        with self._lock:
            free = self._free.get(key)
            if free:
                self._free.move_to_end(key)
                return free.pop()
        return torch.empty(key[0], dtype=dtype, device=device)

    def give(self, t: torch.Tensor | None) -> None:
        if t is None:
            return
        key = self._key(t.shape, t.dtype, t.device)
        with self._lock:
            free = self._free.setdefault(key, [])
            self._free.move_to_end(key)
            if len(free) < self.per_key and all(f is not t for f in free):
                free.append(t)
            while len(self._free) > self.max_keys:
                self._free.popitem(last=False)

    def clear(self) -> None:
        """Drop every pooled tensor (frees the memory)."""
        with self._lock:
            self._free.clear()

    def nbytes(self) -> int:
        """Bytes held by the pool."""
        with self._lock:
            return sum(t.numel() * t.element_size() for f in self._free.values() for t in f)


#: the process-wide pool used by the native ops
POOL = ScratchPool()
