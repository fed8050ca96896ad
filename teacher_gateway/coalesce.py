"""In-flight coalescing: concurrent requests of one process for the same tile share one teacher call.

A request claims the cache keys of the tiles it is about to send to the teacher. A request that finds a
key already claimed waits for the claimer's future instead of sending the tile again. The claimer
settles every future it claimed: with the embedding, with :class:`NotSent` when a budget or quota kept
the tile back (the waiter then claims it itself), or with the error of the teacher call, so no waiter
waits forever.

Coalescing is per process. Two gateway processes on one cache may embed the same tile at the same
time; the cache's ``INSERT OR IGNORE`` then keeps the first embedding stored, and both return it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np


class NotSent(Exception):
    """The claimer did not send this tile to the teacher, so a waiter must claim it itself."""


class InFlightTiles:
    """The claimed keys of one process, each with the future of its embedding; safe for threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[str, Future[np.ndarray]] = {}
        self._waiters = 0

    def claim(self, keys: list[str]) -> tuple[list[str], dict[str, Future[np.ndarray]]]:
        """Claim the unclaimed ``keys`` and return them, with the futures of the keys claimed by others.

        The caller must settle every key it claimed with :meth:`resolve` or :meth:`fail`.
        """
        owned: list[str] = []
        waiting: dict[str, Future[np.ndarray]] = {}
        with self._lock:
            for key in keys:
                future = self._futures.get(key)
                if future is None:
                    self._futures[key] = Future()
                    owned.append(key)
                else:
                    waiting[key] = future
        return owned, waiting

    def resolve(self, key: str, embedding: np.ndarray) -> None:
        """Hand the embedding of a claimed key to its waiters and release the claim."""
        with self._lock:
            future = self._futures.pop(key)
        future.set_result(embedding)

    def fail(self, key: str, error: BaseException) -> None:
        """Raise ``error`` in the waiters of a claimed key and release the claim."""
        with self._lock:
            future = self._futures.pop(key)
        future.set_exception(error)

    def wait(self, future: Future[np.ndarray]) -> np.ndarray:
        """Return the embedding of another request's claim, or raise its error (:class:`NotSent` included)."""
        with self._lock:
            self._waiters += 1
        try:
            return future.result()
        finally:
            with self._lock:
                self._waiters -= 1

    @property
    def claimed(self) -> int:
        """Number of keys claimed now, that is tiles being embedded by the teacher."""
        with self._lock:
            return len(self._futures)

    @property
    def waiters(self) -> int:
        """Number of threads waiting now for another request's teacher call."""
        with self._lock:
            return self._waiters
