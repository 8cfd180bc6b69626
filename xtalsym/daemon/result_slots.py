"""Shaped DPs back from the workers through shared memory instead of the result pipe.

Every frame's shaped DP (224 × 224 × 3 uint8, 150 kB) used to travel back pickled through the
process pool's result pipe: the pool's manager thread in the serve process read it in 64 kB
chunks, each a GIL hand-over, and unpickled it (~0.3 CPU-ms per frame in isolation, more beside
the inference and combine threads). Now the serve process owns one shared-memory block of
``n`` slots; the ingest thread gives each frame job a free slot, the worker writes the shaped DP
into it and returns only the small rest of its result, and the inference thread copies the DP
out and frees the slot when it takes the result (:meth:`Pipeline._add_view`). When every slot
is taken (they outnumber the frames the workers may hold, so only a drop_oldest burst does
that) a job carries no slot and its DP comes back through the pipe as before.
"""

from __future__ import annotations

import threading
from collections import deque
from multiprocessing import shared_memory

import numpy as np


class ResultSlots:
    """``n`` slots of ``shape`` uint8 in one shared-memory block (owned by the serve process)."""

    def __init__(self, n: int, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.slot_bytes = int(np.prod(self.shape))
        self.n = int(n)
        self._shm = shared_memory.SharedMemory(create=True, size=max(1, self.n * self.slot_bytes))
        self._free: deque[int] = deque(range(self.n))
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._shm.name

    def __len__(self) -> int:
        """Slots taken."""
        with self._lock:
            return self.n - len(self._free)

    def take(self) -> int | None:
        """A free slot's index, or None when all are taken (the job then returns its DP through the pipe)."""
        with self._lock:
            return self._free.popleft() if self._free else None

    def job_slot(self, index: int) -> tuple[str, int, int]:
        """What a frame job carries to its worker: (block name, slot index, slot bytes)."""
        return self._shm.name, index, self.slot_bytes

    def read(self, slot: int) -> np.ndarray:
        """A copy of the DP a worker wrote into ``slot`` (the slot is reused once released)."""
        view = np.ndarray(self.shape, np.uint8, buffer=self._shm.buf, offset=slot * self.slot_bytes)
        return view.copy()

    def release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def close(self) -> None:
        """Remove the block (its name first: a mapping still in use stays valid until it goes)."""
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass
        try:
            self._shm.close()
        except BufferError:  # a read in progress on a thread that outlived stop(): the exit unmaps it
            pass


_attached: dict[str, shared_memory.SharedMemory] = {}


def write(slot: tuple[str, int, int], array: np.ndarray) -> bool:
    """In a worker: put ``array`` into ``slot`` = (block name, index, slot bytes); False (nothing
    written: the DP goes back through the pipe) when it is not a uint8 array of the slot's size."""
    name, index, slot_bytes = slot
    if array.dtype != np.uint8 or array.nbytes != slot_bytes:
        return False
    shm = _attached.get(name)
    if shm is None:
        if len(_attached) >= 4:  # blocks of earlier pipelines (several in one process, as in the tests)
            _attached.pop(next(iter(_attached))).close()
        shm = _attached[name] = shared_memory.SharedMemory(name=name)
    np.ndarray(array.shape, np.uint8, buffer=shm.buf, offset=index * slot_bytes)[...] = array
    return True
