"""The canary drift check: re-embed a few cached tiles and stop calling a teacher whose embeddings changed.

A vendor can change the model behind an unchanged name, and the cache would then mix two models under
one identity. So at start and every ``interval_s`` seconds, the check has the teacher embed again the
``tiles`` oldest cache entries of its identity, whose prepared tiles the cache stores as PNG. Then it
computes each new embedding's cosine similarity to the stored one. When the smallest is below
``min_cosine``, the check sets the service's ``teacher_block``. Every request that needs the teacher then
fails with 503 ``teacher_drift``, ``/readyz`` reports it, and cached embeddings are still served. The
block lasts until the gateway restarts, which should be with a new identity for the changed model.

Canary calls are charged to the budget under the caller ``canary``, all or nothing. A check that
cannot run (no cached tiles yet, budget used up, teacher error) is logged and changes nothing.

Each passed check is stored in the usage ledger beside the cache. A gateway that starts less than
``interval_s`` after the last passed check of its teacher, by any process sharing the cache, does not
check again at start and pays nothing. Its first scheduled check comes one interval after that last
check. With ``interval_s`` 0 every start checks. A check that found drift is not stored, so the next
start checks again.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from shared.errors import UniteError
from shared.imaging import decode_image
from teacher_gateway.errors import TeacherDriftError
from teacher_gateway.metrics import gauge
from teacher_gateway.service import CANARY_CALLER, EmbeddingService
from teacher_gateway.usage import CanaryCheck

logger = logging.getLogger(__name__)

MIN_COSINE_SETTING = "UNITE_GATEWAY_CANARY_MIN_COSINE"
_LOG_LEVELS = {"ok": logging.INFO, "skipped": logging.WARNING, "failed": logging.WARNING, "drift": logging.ERROR}


@dataclass(frozen=True)
class CanaryResult:
    """The outcome of one check: ``status`` is ``ok``, ``drift``, ``skipped`` or ``failed``, with the reason in ``detail``."""

    status: str
    detail: str
    tiles: int = 0
    min_cosine: float | None = None
    checked_at: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "status": self.status,
            "detail": self.detail,
            "tiles": self.tiles,
            "min_cosine": self.min_cosine,
            "checked_at": self.checked_at,
        }


class CanaryMonitor:
    """Runs the drift check for ``service`` at :meth:`start` and then every ``interval_s`` seconds (0: at start only)."""

    def __init__(self, service: EmbeddingService, *, tiles: int, interval_s: float, min_cosine: float) -> None:
        self.service = service
        self.tiles = tiles
        self.interval_s = interval_s
        self.min_cosine = min_cosine
        self.last: CanaryResult | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._check_lock = threading.Lock()
        service.metrics.add_collector(self._collect)

    def start(self) -> CanaryResult:
        """Check now unless a recent check passed, then start the scheduled checks in a background thread.

        Returns the result of the check at start, or for a recent passed check an ``ok`` result that
        describes it.
        """
        result = self._recent_check()
        if result is None:
            result = self.check()
        else:
            self.last = result
            logger.info("canary check of teacher %s: %s", self.service.teacher.identity, result.detail)
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._run_schedule, name="canary-check", daemon=True)
            self._thread.start()
        return result

    def stop(self) -> None:
        """Stop the scheduled checks and wait for a check in progress to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _recent_check(self, *, when: str = "at start", now: float | None = None) -> CanaryResult | None:
        """Return the last passed check of this teacher as a result when it is less than ``interval_s`` old, else None.

        A stored check with fewer tiles or a lower minimum cosine than this monitor's settings does not count.
        """
        if self.interval_s <= 0:
            return None
        stored = self.service.ledger.last_canary_check(self.service.teacher.identity)
        now = time.time() if now is None else now
        if stored is None or stored.tiles < self.tiles or stored.min_cosine < self.min_cosine:
            return None
        age_s = now - stored.checked_at
        if not 0 <= age_s < self.interval_s:
            return None
        detail = (
            f"not repeated {when}, because the last check passed {age_s / 60:.1f} minutes ago, less than the "
            f"interval of {self.interval_s / 60:g} minutes: {stored.tiles} canary tiles, minimum cosine similarity "
            f"{stored.min_cosine:.6f} (threshold {self.min_cosine})"
        )
        return CanaryResult("ok", detail, tiles=stored.tiles, min_cosine=stored.min_cosine, checked_at=stored.checked_at)

    def check(self) -> CanaryResult:
        """Re-embed the canary tiles once, compare them with the cache, and block the teacher on drift.

        An unexpected error of the teacher or the cache is logged with its traceback and gives a ``failed``
        result, so neither the startup nor the schedule stops. The result names only the error's type,
        because ``/v1/usage`` shows it to clients.
        """
        with self._check_lock:
            try:
                result = self._check()
            except Exception as error:
                logger.exception("canary check of teacher %s failed unexpectedly", self.service.teacher.identity)
                result = CanaryResult("failed", f"unexpected {type(error).__name__}; the gateway log has the cause", checked_at=time.time())
        self.last = result
        if result.status == "ok":
            check = CanaryCheck(checked_at=result.checked_at, tiles=result.tiles, min_cosine=float(result.min_cosine))
            try:
                self.service.ledger.record_canary_check(self.service.teacher.identity, check)
            except UniteError as error:
                # Only costs a repeated check at the next start, so the gateway keeps running.
                logger.warning("canary check of teacher %s passed but was not stored: %s", self.service.teacher.identity, error.message)
        logger.log(_LOG_LEVELS[result.status], "canary check of teacher %s: %s", self.service.teacher.identity, result.detail)
        return result

    def _check(self) -> CanaryResult:
        service = self.service
        identity = service.teacher.identity
        now = time.time()
        if service.teacher_block is not None:
            return CanaryResult("drift", service.teacher_block.message, checked_at=now)

        entries = list(itertools.islice(service.cache.iter_entries(identity, batch=self.tiles), self.tiles))
        if not entries:
            return CanaryResult("skipped", "no cached tiles of this teacher yet, so nothing to compare", checked_at=now)
        tiles = np.stack([decode_image(entry.tile_png, name=f"cached tile {entry.key}") for entry in entries])
        stored = np.stack([entry.embedding for entry in entries])

        try:
            embeddings, reservation = service.call_teacher(tiles, caller=CANARY_CALLER, all_or_nothing=True)
        except UniteError as error:
            return CanaryResult("failed", f"the teacher call failed ({error.code}: {error.message})", checked_at=now)
        if reservation.tiles < len(tiles):
            return CanaryResult(
                "skipped",
                f"the budget does not cover {len(tiles)} canary tiles ({reservation.limited_by}); raise the budget to keep checking",
                checked_at=now,
            )

        cosines = _cosine_similarities(embeddings, stored)
        min_cosine = float(cosines.min())
        if min_cosine >= self.min_cosine:
            return CanaryResult(
                "ok",
                f"{len(tiles)} canary tiles, minimum cosine similarity {min_cosine:.6f} (threshold {self.min_cosine})",
                tiles=len(tiles),
                min_cosine=min_cosine,
                checked_at=now,
            )

        block = TeacherDriftError(
            f"teacher {identity} drifted: {len(tiles)} canary tiles (the oldest cached for this identity) re-embedded now "
            f"have a minimum cosine similarity of {min_cosine:.6f} to their cached embeddings, below the threshold "
            f"{self.min_cosine} ({MIN_COSINE_SETTING}). The gateway no longer calls this teacher, and the embeddings "
            "cached since the last passing canary check are quarantined, so the changed model's embeddings are not "
            "served under this identity; older cached embeddings are still served. Give the changed model a new identity (a new "
            "model name or version in the teacher's settings) and restart the gateway.",
            limit=self.min_cosine,
            value=min_cosine,
        )
        service.block_for_drift(block, keep=[entry.key for entry in entries])
        return CanaryResult("drift", block.message, tiles=len(tiles), min_cosine=min_cosine, checked_at=now)

    def _run_schedule(self) -> None:
        while True:
            # A check is due one interval after the last one, which may predate this start.
            last_checked = self.last.checked_at if self.last is not None and self.last.checked_at else time.time()
            if self._stop.wait(min(self.interval_s, max(0.0, last_checked + self.interval_s - time.time()))):
                return
            if self.service.teacher_block is not None:
                return
            # Another gateway process on the same cache may have checked in the meantime, and paid for it.
            recent = self._recent_check(when="on schedule")
            if recent is not None and recent.checked_at > last_checked:
                self.last = recent
                continue
            self.check()

    def _collect(self):
        identity = self.service.teacher.identity
        labels = {"teacher": identity}
        yield gauge(
            "teacher_drift", "1 when the canary check found drift and the teacher is blocked, else 0.", labels, float(self.service.teacher_block is not None)
        )
        last = self.last
        if last is not None and last.min_cosine is not None:
            yield gauge("canary_min_cosine", "Minimum cosine similarity of the last canary check that ran.", labels, last.min_cosine)
        if last is not None:
            yield gauge("canary_checked_timestamp_seconds", "Unix time of the last canary check.", labels, last.checked_at)


def _cosine_similarities(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Return the cosine similarity of each row of ``first`` with the same row of ``second``.

    Two zero rows count as identical (1) and a zero row against a non-zero one as unrelated (0).
    """
    first = first.astype(np.float64)
    second = second.astype(np.float64)
    first_norms = np.linalg.norm(first, axis=1)
    second_norms = np.linalg.norm(second, axis=1)
    norms = first_norms * second_norms
    dots = np.einsum("ij,ij->i", first, second)
    both_zero = (first_norms == 0) & (second_norms == 0)
    similarities = np.divide(dots, norms, out=both_zero.astype(np.float64), where=norms > 0)
    return similarities
