"""Peak tensor memory of a training run on the CPU, measured at the dispatcher.

torch keeps no allocator statistics on the CPU (``torch.cuda.max_memory_allocated`` has no
CPU counterpart), and the process's RSS is a poor proxy at the tiny presets' scale: a few MB
of tensors against hundreds of MB of interpreter, libraries, arenas that glibc keeps after a
free, and other threads (the data feed, an in-process teacher's pool). So the peak is counted
the way the CUDA caching allocator counts it, storage by storage:

- :class:`TensorMemory` is a ``TorchDispatchMode``: every tensor an operator returns (forward,
  backward -- the autograd engine runs CPU backward on the calling thread with its modes --
  and the optimizer step) has its ``UntypedStorage`` recorded once with its ``nbytes``; a weak
  reference to the storage takes the bytes off when the storage is freed. ``live`` is the
  bytes of the storages alive now, ``peak`` its maximum.
- Storages that existed before the mode was entered (the weights, their buffers) are added
  with :meth:`TensorMemory.add`, once each.

What it does not see: memory an operator allocates and frees inside its own kernel (a
workspace); tensors other threads create (modes are thread-local: the teacher's pool, the
data feed). Both are outside what a memory plan of the trainer's process counts. The count
is exact and deterministic: it does not depend on how loaded the machine is.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created under it (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def _record(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested or subclass wrappers
            return
        key = storage._cdata
        if key in self._refs and self._refs[key]() is not None:
            return
        nbytes = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def add(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count storages that exist already (each once, however many tensors view it)."""
        for tensor in tensors:
            self._record(tensor)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._record(value)
        return out
