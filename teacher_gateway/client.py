"""A synchronous client of the embeddings protocol, used by the CLI to fill the cache through a gateway.

It sends tiles as base64 PNG in batches, with the gateway's API key when one is given (or set in
:data:`API_KEY_ENV`). It retries rate limits and quotas (429), server errors (5xx) and connection failures
a few times with exponential back-off, waiting at least the server's ``Retry-After``, and raises
:class:`TeacherError` with the server's JSON error message for every other failure. A 402
``budget_exhausted`` or a 503 ``teacher_drift`` is not retried, because waiting does not end either.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
)

from shared.errors import ConfigError, TeacherError
from shared.imaging import encode_base64_png
from teacher_gateway.teachers.rate_limit import parse_retry_after

logger = logging.getLogger(__name__)

RETRY_STATUS_CODES = frozenset({429, 500, 502, 503, 504})
# Error codes of a retryable status that no wait resolves: the gateway stopped calling a drifted teacher.
FINAL_ERROR_CODES = frozenset({"teacher_drift"})
API_KEY_ENV = "UNITE_API_KEY"


class _RetryableResponse(Exception):
    """A response with a status worth retrying; converted to :class:`TeacherError` once retries run out."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


class GatewayResponseError(TeacherError):
    """An error response of the server; ``server_code`` is the code of its JSON error, such as ``budget_exhausted``."""

    def __init__(self, message: str, *, server_code: str | None, limit: Any = None, value: Any = None) -> None:
        super().__init__(message, limit=limit, value=value)
        self.server_code = server_code


class GatewayClient:
    """Client of a gateway (or any server of the embeddings protocol) at ``base_url``.

    ``timeout`` is in seconds per request, and ``batch_size`` tiles go in one request. A failing request is
    tried at most ``max_attempts`` times. The waits between tries start at ``retry_wait_s`` seconds and
    double, up to 10 s, or last the server's ``Retry-After`` when that is longer, up to ``max_retry_after_s``.
    ``api_key`` is sent as ``Authorization: Bearer``; None reads it from the environment variable
    :data:`API_KEY_ENV`, and sends none when that is unset. The key is never logged.
    """

    def __init__(
        self,
        base_url: str,
        timeout: float = 120.0,
        *,
        batch_size: int = 64,
        model: str | None = None,
        max_attempts: int = 3,
        retry_wait_s: float = 0.5,
        max_retry_after_s: float = 120.0,
        api_key: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"gateway client batch_size is {batch_size}, expected at least 1.", limit=1, value=batch_size)
        if max_attempts < 1:
            raise ConfigError(f"gateway client max_attempts is {max_attempts}, expected at least 1.", limit=1, value=max_attempts)
        self.base_url = base_url.rstrip("/")
        self.batch_size = batch_size
        self.model = model
        self.max_attempts = max_attempts
        self.retry_wait_s = retry_wait_s
        self.max_retry_after_s = max_retry_after_s
        # Where the key came from, named in the message of a 401: "argument", the variable's name, or None.
        self._api_key_source = "argument" if api_key else None
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV, "").strip() or None
            self._api_key_source = API_KEY_ENV if api_key else None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def embed(
        self,
        tiles: Sequence[np.ndarray],
        *,
        slide_id: str | Sequence[str | None] | None = None,
        coords: Sequence[tuple[int, int] | None] | None = None,
        mpp: float | Sequence[float | None] | None = None,
    ) -> np.ndarray:
        """Embed RGB uint8 tiles and return an (N, D) float32 array in the order of ``tiles``.

        ``slide_id`` and ``mpp`` take one value for all tiles or one per tile; ``coords`` takes one
        level-0 (x, y) per tile. They are stored with the tile in the gateway's cache.
        """
        return self.embed_with_usage(tiles, slide_id=slide_id, coords=coords, mpp=mpp)[0]

    def embed_with_usage(
        self,
        tiles: Sequence[np.ndarray],
        *,
        slide_id: str | Sequence[str | None] | None = None,
        coords: Sequence[tuple[int, int] | None] | None = None,
        mpp: float | Sequence[float | None] | None = None,
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Embed tiles like :meth:`embed` and also return the server's usage counts, summed over batches."""
        batches = []
        usage: dict[str, int] = {}
        for inputs in self._input_batches(tiles, slide_id=slide_id, coords=coords, mpp=mpp):
            embeddings, batch_usage = self._embed_batch(inputs)
            batches.append(embeddings)
            for name, value in batch_usage.items():
                if isinstance(value, int):
                    usage[name] = usage.get(name, 0) + value
        if not batches:
            return np.zeros((0, 0), dtype=np.float32), usage
        return np.concatenate(batches), usage

    def dry_run(self, tiles: Sequence[np.ndarray]) -> dict[str, Any]:
        """Return what embedding ``tiles`` would cost now, summed over batches, without the teacher being called.

        Sends each batch to ``POST /v1/embeddings/dry-run``. ``tiles``, ``cache_hits``, ``tiles_to_embed``
        and ``teacher_calls`` are summed; ``budget`` and ``model`` come from the last batch. A tile that
        occurs in two batches counts twice, so pass distinct tiles.
        """
        summed = ("tiles", "cache_hits", "tiles_to_embed", "teacher_calls")
        totals: dict[str, Any] = dict.fromkeys(summed, 0)
        for inputs in self._input_batches(tiles):
            plan = self._request("POST", "/v1/embeddings/dry-run", json=self._payload(inputs))
            for name in summed:
                totals[name] += int(plan.get(name, 0))
            totals["model"] = plan.get("model")
            totals["budget"] = plan.get("budget")
            totals["teacher_blocked"] = plan.get("teacher_blocked", False)
        return totals

    def usage(self) -> dict[str, Any]:
        """Return the server's ``GET /v1/usage`` report: counts per teacher and key, budget, canary check."""
        return self._request("GET", "/v1/usage")

    def models(self) -> list[dict[str, Any]]:
        """Return the models the server lists under ``GET /v1/models``."""
        return self._request("GET", "/v1/models")["data"]

    def service(self) -> Any:
        """Return the ``service`` field of the server's ``GET /v1/models`` response, or None when it has none.

        A UNITE teacher gateway returns ``shared.protocol.GATEWAY_SERVICE`` and a student server
        ``shared.protocol.STUDENT_SERVICE``.
        """
        return self._request("GET", "/v1/models").get("service")

    def model_info(self) -> dict[str, Any]:
        """Return the served model as ``{"identity", "dim", "licence", "names"}``.

        Raises :class:`TeacherError` when the server lists no model or one without an identity.
        """
        models = self.models()
        if not models or not isinstance(models[0], dict) or "id" not in models[0]:
            raise TeacherError(
                f"gateway {self.base_url} lists no model under GET /v1/models (got {models!r}). "
                "Check that the URL points at a UNITE gateway."
            )
        model = models[0]
        return {
            "identity": model["id"],
            "dim": model.get("dim"),
            "licence": model.get("licence"),
            "names": model.get("names", [model["id"]]),
        }

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _input_batches(
        self,
        tiles: Sequence[np.ndarray],
        *,
        slide_id: str | Sequence[str | None] | None = None,
        coords: Sequence[tuple[int, int] | None] | None = None,
        mpp: float | Sequence[float | None] | None = None,
    ) -> list[list[dict[str, Any]]]:
        """Return the protocol inputs of ``tiles`` in batches of ``batch_size``."""
        count = len(tiles)
        slide_ids = _per_tile("slide_id", slide_id, count)
        mpps = _per_tile("mpp", mpp, count)
        all_coords = _per_tile("coords", coords, count, allow_scalar=False)

        batches = []
        for start in range(0, count, self.batch_size):
            inputs = []
            for index in range(start, min(start + self.batch_size, count)):
                item: dict[str, Any] = {"image": encode_base64_png(tiles[index])}
                if slide_ids[index] is not None:
                    item["slide_id"] = slide_ids[index]
                if all_coords[index] is not None:
                    item["coords"] = [int(value) for value in all_coords[index]]
                if mpps[index] is not None:
                    item["mpp"] = float(mpps[index])
                inputs.append(item)
            batches.append(inputs)
        return batches

    def _payload(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        payload: dict[str, Any] = {"input": inputs}
        if self.model is not None:
            payload["model"] = self.model
        return payload

    def _embed_batch(self, inputs: list[dict[str, Any]]) -> tuple[np.ndarray, dict[str, Any]]:
        body = self._request("POST", "/v1/embeddings", json=self._payload(inputs))

        data = body.get("data")
        if not isinstance(data, list) or len(data) != len(inputs):
            found = len(data) if isinstance(data, list) else type(data).__name__
            raise TeacherError(
                f"gateway {self.base_url} returned {found} embeddings for {len(inputs)} tiles, expected one per tile.",
                limit=len(inputs),
                value=found,
            )
        try:
            ordered = sorted(data, key=lambda item: item["index"])
            indices = [item["index"] for item in ordered]
            embeddings = np.array([item["embedding"] for item in ordered], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as error:
            raise TeacherError(
                f"gateway {self.base_url} returned a malformed embeddings response ({type(error).__name__}: {error}). "
                "Check that the server implements the embeddings protocol."
            ) from error
        if indices != list(range(len(inputs))) or embeddings.ndim != 2:
            raise TeacherError(
                f"gateway {self.base_url} returned indices {indices} and embeddings of shape {embeddings.shape}, "
                f"expected indices 0 to {len(inputs) - 1} and one vector each. "
                "Check that the server implements the embeddings protocol."
            )
        usage = body.get("usage")
        if not isinstance(usage, dict):
            usage = {}
        return embeddings, usage

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """Send one request with retries and return its JSON body; raise :class:`TeacherError` on failure."""
        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(lambda error: isinstance(error, (httpx.TransportError, _RetryableResponse))),
            before_sleep=self._log_retry,
            reraise=True,
        )
        url = f"{self.base_url}{path}"
        try:
            response = retrying(self._send, method, path, **kwargs)
        except httpx.TransportError as error:
            raise TeacherError(
                f"cannot reach the gateway at {url} after {self.max_attempts} attempts ({type(error).__name__}: {error}). "
                "Check that it runs (unite serve-gateway) and that the URL is right."
            ) from error
        except _RetryableResponse as error:
            response = error.response

        if response.is_success:
            return response.json()
        error_body = _error_body(response)
        if response.status_code == 401:
            raise GatewayResponseError(
                self._unauthorized_message(url, error_body),
                server_code=error_body.get("code"),
                limit=error_body.get("limit"),
                value=error_body.get("value"),
            )
        raise GatewayResponseError(
            f"gateway {url} returned HTTP {response.status_code}: {error_body.get('message', response.text[:500])}",
            server_code=error_body.get("code"),
            limit=error_body.get("limit"),
            value=error_body.get("value"),
        )

    def _unauthorized_message(self, url: str, error_body: dict[str, Any]) -> str:
        """Return the message of a 401: the server's reason, then how a command-line user passes the key.

        The server's own advice names HTTP headers, which a user of ``unite teach`` cannot set, so the
        fix named here is the environment variable :data:`API_KEY_ENV`.
        """
        reason = str(error_body.get("message", "unauthorized")).split(". ")[0].rstrip(".")
        if self._api_key_source is None:
            fix = (
                f"No API key was sent, because the environment variable {API_KEY_ENV} is unset or empty. Set it to "
                f"your key for this gateway (export {API_KEY_ENV}=<key>) and run the command again; the gateway's "
                "operator issues the keys."
            )
        elif self._api_key_source == API_KEY_ENV:
            fix = (
                f"The key sent is the one in the environment variable {API_KEY_ENV}. Set {API_KEY_ENV} to a key of this "
                "gateway's keys file and run the command again; the gateway's operator issues the keys."
            )
        else:
            fix = "The key sent is the api_key given to GatewayClient. Pass a key of this gateway's keys file."
        return f"gateway {url} returned HTTP 401 (unauthorized): {reason}. {fix}"

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code in RETRY_STATUS_CODES and _error_body(response).get("code") not in FINAL_ERROR_CODES:
            raise _RetryableResponse(response)
        return response

    def _wait(self, state: RetryCallState) -> float:
        """Wait the exponential back-off, or the server's Retry-After when longer, capped at ``max_retry_after_s``."""
        backoff = min(self.retry_wait_s * 2 ** (state.attempt_number - 1), 10.0)
        error = state.outcome.exception() if state.outcome is not None else None
        retry_after = None
        if isinstance(error, _RetryableResponse):
            retry_after = parse_retry_after(error.response.headers.get("retry-after"))
        if retry_after is None:
            return backoff
        return min(max(backoff, retry_after), self.max_retry_after_s)

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        logger.warning(
            "gateway %s: attempt %d of %d failed (%s); retrying in %.1f s",
            self.base_url,
            state.attempt_number,
            self.max_attempts,
            error,
            state.next_action.sleep if state.next_action is not None else 0.0,
        )


def _per_tile(name: str, value: Any, count: int, *, allow_scalar: bool = True) -> list[Any]:
    """Expand a value given once for all tiles, or check a sequence given per tile."""
    if value is None:
        return [None] * count
    if allow_scalar and isinstance(value, (str, int, float)):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ConfigError(f"{name} has {len(values)} values for {count} tiles, expected one per tile.", limit=count, value=len(values))
    return values


def _error_body(response: httpx.Response) -> dict[str, Any]:
    """Return the ``error`` object of a protocol error response, or an empty dict for any other body."""
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}
