"""Retry policy of the remote teacher: which failed attempts are retried, how long to wait, when to give up.

An attempt that fails raises :class:`AttemptError`, marked transient or not. Connection errors, timeouts,
HTTP 408, 429 and 5xx other than 501 and 505 are transient, and :func:`batch_retrying` retries them up to
``max_attempts`` attempts in all. Before each retry it waits a fully jittered exponential backoff capped at
``backoff_cap_s``, or the provider's ``Retry-After`` when that is longer. :func:`status_error` makes a
``Retry-After`` longer than ``max_retry_after_s`` permanent, so the batch ends instead of waiting.
"""

from __future__ import annotations

from collections.abc import Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential
from tenacity.wait import wait_base

from teacher_gateway.teachers.rate_limit import parse_retry_after

# Kinds of failed attempt that are retried.
TRANSIENT_KINDS = ("connection_error", "timeout", "request_timeout", "rate_limited", "server_error")
# 501 Not Implemented and 505 HTTP Version Not Supported describe the request, so a retry cannot succeed.
PERMANENT_SERVER_STATUSES = frozenset({501, 505})


class AttemptError(Exception):
    """One failed attempt: its kind, a message safe to log, the HTTP status and Retry-After if any."""

    def __init__(
        self, kind: str, message: str, *, transient: bool, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.transient = transient
        self.status = status
        self.retry_after = retry_after


def is_transient(error: BaseException) -> bool:
    return isinstance(error, AttemptError) and error.transient


class BackoffOrRetryAfter(wait_base):
    """Waits a fully jittered exponential backoff, or the provider's Retry-After when that is longer."""

    def __init__(self, base_s: float, cap_s: float) -> None:
        self._backoff = wait_random_exponential(multiplier=base_s, max=cap_s)

    def __call__(self, retry_state: RetryCallState) -> float:
        backoff = self._backoff(retry_state)
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        retry_after = getattr(error, "retry_after", None)
        return backoff if retry_after is None else max(backoff, retry_after)


def batch_retrying(
    *, max_attempts: int, backoff_base_s: float, backoff_cap_s: float, before_sleep: Callable[[RetryCallState], None]
) -> AsyncRetrying:
    """Return tenacity's retry loop for one batch; it re-raises the last :class:`AttemptError` when it gives up."""
    return AsyncRetrying(
        stop=stop_after_attempt(max_attempts),
        wait=BackoffOrRetryAfter(backoff_base_s, backoff_cap_s),
        retry=retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )


def status_error(status: int, provider_message: str, retry_after_header: str | None, *, max_retry_after_s: float) -> AttemptError:
    """Classify a response with an error status as a failed attempt.

    The error's ``retry_after`` is the delay that the ``Retry-After`` header of a transient failure requests.
    A delay longer than ``max_retry_after_s`` makes the failure permanent.
    """
    if status == 408:
        kind, transient = "request_timeout", True
    elif status == 429:
        kind, transient = "rate_limited", True
    elif status >= 500:
        kind, transient = "server_error", status not in PERMANENT_SERVER_STATUSES
    else:
        kind, transient = "http_error", False

    message = f"provider returned HTTP {status}: {provider_message}"
    retry_after = parse_retry_after(retry_after_header) if transient else None
    if retry_after is not None and retry_after > max_retry_after_s:
        transient = False
        message += (
            f"; it asked to retry after {retry_after:g} s, more than max_retry_after_s = "
            f"{max_retry_after_s:g} s, so the batch was not retried"
        )
    return AttemptError(kind, message, transient=transient, status=status, retry_after=retry_after)
