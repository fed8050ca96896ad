"""Client-side rate limits for a paid API: at most so many requests and tiles in any window of time.

Providers state their limits per minute (requests per minute, and tokens or images per minute).
:class:`RateLimiter` keeps a log of the sends of the last window and lets a send go only when the log plus
the send stays within both limits, so the limits hold in every window, not only on average. A shorter window
spreads the traffic more evenly, with the per-minute limits scaled down to it. When the window divides 60 s,
every minute is covered by a whole number of windows, so the per-minute limits are still met.

A provider's ``Retry-After`` header pauses every sender, not only the one that received it:
:meth:`RateLimiter.pause_until`. :func:`parse_retry_after` reads the header in both forms that HTTP
allows (RFC 9110, section 10.2.3): a number of seconds or an HTTP date.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from datetime import timezone
from email.utils import parsedate_to_datetime

SECONDS_PER_MINUTE = 60.0


def per_window_limit(per_minute: int | None, window_s: float) -> int | None:
    """Scale a per-minute limit down to a window of ``window_s`` seconds, rounding down; None stays None."""
    if per_minute is None:
        return None
    # The small tolerance keeps 600 per minute at exactly 5 per 0.5 s despite binary rounding.
    return math.floor(per_minute * window_s / SECONDS_PER_MINUTE + 1e-9)


def divides_minute(window_s: float) -> bool:
    """Return whether a window of ``window_s`` seconds fits a whole number of times into 60 s."""
    windows = SECONDS_PER_MINUTE / window_s
    return window_s > 0 and abs(windows - round(windows)) < 1e-9


class RateLimiter:
    """Lets a send of ``tiles`` tiles go once the last ``window_s`` seconds leave room for it.

    The window is half-open: a send at time t counts against every send in (t - window_s, t], so any
    interval of ``window_s`` seconds contains at most ``max_requests`` sends and ``max_tiles`` tiles. A limit
    of None is no limit. Senders go in the order they arrive, so a large batch is never starved by small
    ones. The limiter belongs to one asyncio event loop, and every caller of one teacher shares it.
    """

    def __init__(
        self,
        *,
        window_s: float,
        max_requests: int | None = None,
        max_tiles: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not window_s > 0:
            raise ValueError(f"rate limit window_s is {window_s}, expected a positive number of seconds")
        for name, limit in (("max_requests", max_requests), ("max_tiles", max_tiles)):
            if limit is not None and limit < 1:
                raise ValueError(f"rate limit {name} is {limit}, expected at least 1 or None for no limit")
        self.window_s = window_s
        self.max_requests = max_requests
        self.max_tiles = max_tiles
        self._clock = clock
        self._sends: deque[tuple[float, int]] = deque()
        self._tiles_in_window = 0
        self._paused_until = -math.inf
        self._lock = asyncio.Lock()

    async def acquire(self, tiles: int) -> float:
        """Wait until a send of ``tiles`` tiles fits the limits, record it, and return the seconds waited.

        Raises ValueError for a send larger than ``max_tiles``, which could never fit.
        """
        if self.max_tiles is not None and tiles > self.max_tiles:
            raise ValueError(
                f"a send of {tiles} tiles can never fit the limit of {self.max_tiles} tiles per {self.window_s:g} s"
            )
        started = self._clock()

        # The lock is held while waiting, so senders leave in arrival order.
        async with self._lock:
            while True:
                now = self._clock()
                self._forget_sends_before(now - self.window_s)
                delay = self._delay_until_room(tiles, now)
                if delay <= 0:
                    self._sends.append((now, tiles))
                    self._tiles_in_window += tiles
                    return now - started
                await asyncio.sleep(delay)

    def pause_until(self, deadline: float) -> None:
        """Hold every send until the clock reaches ``deadline``, for instance a provider's ``Retry-After``."""
        self._paused_until = max(self._paused_until, deadline)

    def _forget_sends_before(self, cutoff: float) -> None:
        while self._sends and self._sends[0][0] <= cutoff:
            _, tiles = self._sends.popleft()
            self._tiles_in_window -= tiles

    def _delay_until_room(self, tiles: int, now: float) -> float:
        """Return the seconds until enough logged sends leave the window (and any pause ends) for this send."""
        ready_at = self._paused_until

        if self.max_requests is not None and len(self._sends) >= self.max_requests:
            # The send that must leave the window is the one max_requests places before the end of the log.
            oldest_to_expire = self._sends[len(self._sends) - self.max_requests][0]
            ready_at = max(ready_at, oldest_to_expire + self.window_s)

        if self.max_tiles is not None:
            excess = self._tiles_in_window + tiles - self.max_tiles
            for sent_at, sent_tiles in self._sends:
                if excess <= 0:
                    break
                excess -= sent_tiles
                ready_at = max(ready_at, sent_at + self.window_s)

        return ready_at - now


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Return the seconds of delay that a ``Retry-After`` header requests, or None when it is absent or invalid.

    The header holds delay-seconds (``"120"``; a fraction such as ``"0.5"`` is accepted too, as some
    servers send one) or an HTTP date (``"Wed, 21 Oct 2026 07:28:00 GMT"``), which is measured from
    ``now``, a Unix time that defaults to the current one. A date in the past gives 0.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is not None:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None

    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        # parsedate_to_datetime leaves a date in the zone "-0000" naive, and HTTP dates are always in UTC.
        moment = moment.replace(tzinfo=timezone.utc)
    current = time.time() if now is None else now
    return max(0.0, moment.timestamp() - current)
