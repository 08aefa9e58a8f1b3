"""Peak tensor memory of a region, counted exactly (for tests: no allocator or page-size noise).

:class:`LiveTensorBytes` is a dispatch mode that sees every tensor an operator creates inside it
(forward, backward and checkpoint recomputation alike) and keeps a weak reference to its storage;
the peak is the largest total of storages alive after any operator. Storages that existed before the
region (weights, inputs, optimiser state) are not counted, nor are outputs that reuse an input's
storage (in-place operators, views).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.alive: dict[tuple[int, int], tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self.alive.items() if ref.expired()]:
            self.current -= self.alive.pop(key)[1]
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if storage.data_ptr() in inputs or key in self.alive or not storage.nbytes():
                continue
            self.alive[key] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out
