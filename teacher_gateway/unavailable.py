"""Refusals of a gateway that is alive but cannot take more teacher work now (503, with Retry-After)."""

from __future__ import annotations

from typing import Any

from teacher_gateway.errors import GatewayLimitError


class _RetryLaterError(GatewayLimitError):
    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int, limit: Any = None, value: Any = None) -> None:
        super().__init__(message, limit=limit, value=value)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class GatewayBusyError(_RetryLaterError):
    """As many requests as ``max_teacher_requests`` allows already wait on the teacher."""

    code = "gateway_busy"


class CacheUnavailableError(_RetryLaterError):
    """The cache cannot be written, so the gateway pays the teacher for nothing more until it can."""

    code = "cache_unavailable"
