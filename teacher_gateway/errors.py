"""Errors of the gateway's spending controls, all under :class:`shared.errors.UniteError`::

    UniteError
    └── GatewayLimitError       a request the gateway refuses to pay for or to serve; may carry HTTP headers
        ├── UnauthorizedError   no API key, or a key not in the keys file (401)
        ├── QuotaExceededError  an API key's per-minute quota is used up (429, with Retry-After)
        ├── BudgetExhaustedError  the teacher's budget of tiles or calls is used up (402)
        └── TeacherDriftError   the canary tiles no longer match the cache: the teacher changed (503)

Their messages never contain an API key, so the app returns them whole, with their headers.
"""

from __future__ import annotations

import math
from typing import Any

from shared.errors import UniteError


class GatewayLimitError(UniteError):
    """Base of the gateway's refusals; ``headers`` go into the HTTP response."""

    code = "gateway_limit"
    status_code = 429

    @property
    def headers(self) -> dict[str, str]:
        return {}


class UnauthorizedError(GatewayLimitError):
    code = "unauthorized"
    status_code = 401

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="unite-gateway"'}


class QuotaExceededError(GatewayLimitError):
    """An API key's quota for the current minute is used up; ``retry_after_s`` is the wait until the next minute."""

    code = "quota_exceeded"
    status_code = 429

    def __init__(self, message: str, *, retry_after_s: float, limit: Any = None, value: Any = None) -> None:
        super().__init__(message, limit=limit, value=value)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        # Retry-After takes whole seconds; rounding up never invites a retry inside the same window.
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class BudgetExhaustedError(GatewayLimitError):
    code = "budget_exhausted"
    status_code = 402


class TeacherDriftError(GatewayLimitError):
    code = "teacher_drift"
    status_code = 503
