"""The places for frames in the shaping workers and ``pipeline.overload``, the policy for a
frame that finds them all taken: ``block`` (back-pressure: ZeroMQ buffers ``receive_hwm``
messages, then the sender blocks), ``drop_newest`` (the new frame is dropped) or
``drop_oldest`` (the oldest frame still queued for a worker is cancelled and the new one
takes its place)."""

from __future__ import annotations

import concurrent.futures as cf
import threading


class WorkerSlots:
    """``queue_size`` places; the futures in the workers, oldest first."""

    def __init__(self, queue_size: int) -> None:
        self._slots = threading.BoundedSemaphore(queue_size)
        # futures in the workers, oldest first (a dict keeps insertion order: drop_oldest cancels from the front)
        self._inflight: dict[cf.Future, None] = {}
        self._inflight_lock = threading.Lock()
        self._overload_cancelled: set[cf.Future] = set()  # their slots went to newer frames
        self._cancel_lock = threading.Lock()  # a future is in that set only while surely cancelled

    def __len__(self) -> int:
        return len(self._inflight)

    def take(self, policy: str) -> bool:
        """A place in the workers for one frame, per ``policy``; False = drop the new frame."""
        if policy == "block":  # back-pressure: ZeroMQ buffers receive_hwm messages, then the sender blocks
            self._slots.acquire()
            return True
        if self._slots.acquire(blocking=False):
            return True
        if policy == "drop_oldest":
            with self._inflight_lock:
                oldest_first = list(self._inflight)
            for future in oldest_first:
                with self._cancel_lock:
                    self._overload_cancelled.add(future)  # before cancel(): its callback may run at once
                    if future.cancel():  # still queued, not in a worker yet: its slot passes to the new frame
                        return True
                    self._overload_cancelled.discard(future)
        return False

    def add(self, future: cf.Future) -> None:
        with self._inflight_lock:
            self._inflight[future] = None

    def left_workers(self, future: cf.Future) -> None:
        """The future is done (its result queued): it no longer holds a worker."""
        with self._inflight_lock:
            self._inflight.pop(future, None)

    def cancelled_for_newer(self, future: cf.Future) -> bool:
        """True if drop_oldest cancelled it (its place went to a newer frame: do not release it)."""
        with self._cancel_lock:
            overloaded = future in self._overload_cancelled
            self._overload_cancelled.discard(future)
        return overloaded

    def release(self) -> None:
        self._slots.release()

    def pending(self) -> list[cf.Future]:
        with self._inflight_lock:
            return list(self._inflight)


SHED_REASON = (
    "symmetry evidence skipped for this sample: the daemon was behind when its first frame "
    'arrived (pipeline.evidence_under_load = "shed"); fused from the network and the prior only'
)


class EvidencePlan:
    """Which samples get symmetry evidence (``pipeline.evidence_under_load``).

    The evidence costs about as much CPU per frame as everything else together (docs/RESULTS.md,
    issue 12), so at a rate between the evidence-on and the evidence-off capacity a daemon that
    measures it for every sample falls further and further behind, and then loses frames
    (``drop_oldest``) or blocks the detector (``block``). ``"shed"``: a sample whose first frame
    finds more than ``max_frames`` frames waiting (handed to the workers and not yet assembled:
    the queue half full, on its way to a drop or a block), or the oldest request waiting for the
    combine thread more than ``max_lag`` seconds old (that queue has no bound), is classified
    without evidence (all its frames: its zones are combined together or not at all); its messages
    say so. A burst smaller than that (a series' first frames while the daemon starts) is absorbed.
    ``"keep"``: every sample gets evidence. The decision is made
    once per sample, by the ingest thread, and forgotten when the sample's final request is made
    (a later sample of the same key decides afresh)."""

    def __init__(self, *, policy: str, max_frames: int, max_lag: float, max_samples: int) -> None:
        self.policy = policy
        self.max_frames = max_frames
        self.max_lag = max_lag
        self._max = max_samples  # a bound on the decisions held: samples that never end (lost frames)
        self._decided: dict[tuple[int, str], bool] = {}  # sample key -> evidence on; oldest first
        self._lock = threading.Lock()  # ingest decides, inference forgets

    def wants_evidence(self, key: tuple[int, str], *, frames_waiting: int, combine_lag: float) -> tuple[bool, bool]:
        """(evidence on for this frame's sample, whether this call shed a new sample)."""
        with self._lock:
            on = self._decided.get(key)
            if on is not None:
                return on, False
            on = self.policy == "keep" or (frames_waiting <= self.max_frames and combine_lag <= self.max_lag)
            self._decided[key] = on
            while len(self._decided) > self._max:
                del self._decided[next(iter(self._decided))]
            return on, not on

    def forget(self, key: tuple[int, str]) -> None:
        """The sample's final request is made: its decision is no longer needed."""
        with self._lock:
            self._decided.pop(key, None)

    def __len__(self) -> int:
        return len(self._decided)


class Waiting:
    """Arrival times of what is waiting, oldest first, across threads: :meth:`oldest_age` is how
    far behind the daemon is at that stage."""

    def __init__(self) -> None:
        self._since: dict[object, float] = {}
        self._lock = threading.Lock()

    def add(self, key: object, since: float) -> None:
        with self._lock:
            self._since[key] = since

    def discard(self, key: object) -> None:
        with self._lock:
            self._since.pop(key, None)

    def oldest_age(self, now: float) -> float:
        """Seconds since the oldest waiting item arrived (0 when nothing waits)."""
        with self._lock:
            return now - min(self._since.values()) if self._since else 0.0
