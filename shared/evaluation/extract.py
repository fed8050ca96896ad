"""Patch features of slides from embedding services: tile each slide once, send its tiles to every model.

Every model is reached through the embeddings protocol (``POST /v1/embeddings`` with base64 PNG
tiles), which the teacher gateway and the student server both speak, so a teacher and its student
are read the same way. A slide is tiled once and its tiles go, batch by batch, to each model that has
no feature file for it yet. Each model gets one TRIDENT-layout file per slide,
``FEATURES_ROOT/MODEL/SLIDE.h5``, written only when all its rows are in, so a rerun sends again only
the slides left without a file. The ``encoder`` attribute is the response's ``model``, followed by
``sha256:<checkpoint_sha256>`` when the response names a checkpoint, as the student server does.

Each client also times its embedding batches, so a run records every model's throughput beside its
features in ``FEATURES_ROOT/MODEL/model-info.json``, with the parameter count from ``GET /v1/models``.

Tiles travel with the slide's pseudonymous id, never its file name. httpx, numpy and h5py only, no torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from shared.errors import ConfigError, TeacherError
from shared.features import read_features, trident_attrs, write_features
from shared.imaging import encode_base64_png
from shared.pooling import pool_slide_file
from shared.slides.reader import open_slide
from shared.slides.sources import SlideSource
from shared.slides.tile_job import TileOptions
from shared.slides.tiling import TiledSlide, iter_tiles, tile_slide

logger = logging.getLogger(__name__)

EMBEDDINGS_PATH = "/v1/embeddings"
MODELS_PATH = "/v1/models"
# Written beside a model's patch feature files by the run that sent it tiles, and read by later runs that send none.
MODEL_INFO_FILE = "model-info.json"
# Read when no model-specific variable is set; the same variable `unite teach` reads.
API_KEY_ENV = "UNITE_API_KEY"
RETRY_STATUS_CODES = frozenset({429, 500, 502, 503, 504})
# The maximum wait between two tries, in seconds, whatever the server's Retry-After requests.
MAX_RETRY_WAIT_S = 60.0


def api_key_variable(model: str) -> str:
    """Return the environment variable of ``model``'s API key: ``UNITE_API_KEY_`` plus the name in capitals, ``_`` for other characters."""
    return f"{API_KEY_ENV}_{re.sub(r'[^A-Za-z0-9]', '_', model).upper()}"


def api_key_for(model: str) -> tuple[str | None, str | None]:
    """Return the API key of ``model`` and the variable it came from, or (None, None) when neither variable is set.

    The model's own variable (:func:`api_key_variable`) wins over :data:`API_KEY_ENV`.
    """
    for variable in (api_key_variable(model), API_KEY_ENV):
        key = os.environ.get(variable, "").strip()
        if key:
            return key, variable
    return None, None


class EmbeddingsClient:
    """Client of one server of the embeddings protocol, named ``name`` in outputs and messages.

    ``batch_size`` tiles go in one request and ``timeout`` is in seconds per request. A response with
    status 429 or 5xx, or a connection failure, is tried again up to ``max_attempts`` tries in all. The
    waits start at ``retry_wait_s`` and double, or last the server's numeric ``Retry-After`` when that
    is longer, up to :data:`MAX_RETRY_WAIT_S`. The API key goes as ``Authorization: Bearer`` and is
    never logged. ``requests`` counts the embedding requests that succeeded. ``tiles_embedded`` counts
    the tiles of those requests and ``seconds_embedding`` the wall-clock seconds :meth:`embed` spent on
    them: PNG encoding, the HTTP round trips (retries and their waits included) and JSON decoding.
    """

    def __init__(
        self,
        name: str,
        url: str,
        *,
        batch_size: int = 32,
        timeout: float = 300.0,
        max_attempts: int = 3,
        retry_wait_s: float = 1.0,
        api_key: str | None = None,
        api_key_source: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size is {batch_size}, expected at least 1 tile per request.", value=batch_size, limit=1)
        if max_attempts < 1:
            raise ConfigError(f"max_attempts is {max_attempts}, expected at least 1.", value=max_attempts, limit=1)
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--model {name}={url}: the URL is invalid, expected http:// or https:// and the server's address.", value=url)
        self.name = name
        self.url = url.rstrip("/")
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.retry_wait_s = retry_wait_s
        self.requests = 0
        self.tiles_embedded = 0
        self.seconds_embedding = 0.0
        self._api_key_source = api_key_source
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def embed(
        self, tiles: np.ndarray, *, slide_id: str | None = None, coords: np.ndarray | None = None, mpp: float | None = None
    ) -> tuple[np.ndarray, str]:
        """Embed (N, H, W, 3) uint8 tiles and return the (N, D) float32 embeddings in tile order and the encoder identity.

        Raises :class:`TeacherError` for a failed request, a malformed response, or responses of one
        call that name different models.
        """
        parts = []
        encoders = set()
        for start in range(0, len(tiles), self.batch_size):
            started = time.perf_counter()
            inputs = []
            for index in range(start, min(start + self.batch_size, len(tiles))):
                item: dict[str, Any] = {"image": encode_base64_png(tiles[index])}
                if slide_id is not None:
                    item["slide_id"] = slide_id
                if coords is not None:
                    item["coords"] = [int(value) for value in coords[index]]
                if mpp is not None:
                    item["mpp"] = float(mpp)
                inputs.append(item)
            embeddings, encoder = self._embed_batch(inputs)
            self.seconds_embedding += time.perf_counter() - started
            self.tiles_embedded += len(inputs)
            parts.append(embeddings)
            encoders.add(encoder)
        if len(encoders) > 1:
            raise TeacherError(
                f"model {self.name} ({self.url}) returned the model names {sorted(encoders)} within one slide, so its model changed midway. "
                "Run the command again once the server serves one model.",
                value=sorted(encoders),
            )
        return np.concatenate(parts, axis=0), encoders.pop()

    def throughput(self) -> float | None:
        """Return the tiles embedded per second of :meth:`embed`, or None before any tile was embedded."""
        if self.tiles_embedded == 0 or self.seconds_embedding <= 0:
            return None
        return self.tiles_embedded / self.seconds_embedding

    def throughput_note(self) -> str:
        """Describe how :meth:`throughput` was measured, for the report."""
        host = urlsplit(self.url).hostname or self.url
        return f"{self.tiles_embedded} tiles in requests of up to {self.batch_size} over HTTP to {host}, timed from PNG encoding to the decoded JSON response"

    def model_parameters(self, encoder: str) -> int | None:
        """Return the ``parameters`` of the ``GET /v1/models`` entry named by ``encoder``, or None when the server does not list it.

        ``encoder`` is a feature file's encoder attribute (``MODEL`` or ``MODEL sha256:HASH``). A server
        without the route, an entry without the field and a failed request all give None with a log line,
        because the parameter count is optional in the report.
        """
        model = encoder.split(" sha256:")[0]
        try:
            response = self._http.get(MODELS_PATH)
            response.raise_for_status()
            entries = response.json().get("data")
        except (httpx.HTTPError, ValueError, AttributeError) as error:
            logger.warning(
                "model %s: cannot read %s%s (%s: %s), so its parameter count is not given",
                self.name,
                self.url,
                MODELS_PATH,
                type(error).__name__,
                error,
            )
            return None
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and (entry.get("id") == model or model in (entry.get("names") or [])):
                parameters = entry.get("parameters")
                if isinstance(parameters, int) and not isinstance(parameters, bool) and parameters > 0:
                    return parameters
                logger.info("model %s: %s%s lists no parameter count for %s", self.name, self.url, MODELS_PATH, model)
                return None
        logger.warning("model %s: %s%s does not list %s, so its parameter count is not given", self.name, self.url, MODELS_PATH, model)
        return None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EmbeddingsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _embed_batch(self, inputs: list[dict[str, Any]]) -> tuple[np.ndarray, str]:
        body = self._post({"input": inputs})
        data = body.get("data")
        model = body.get("model")
        if not isinstance(data, list) or len(data) != len(inputs) or not isinstance(model, str) or not model.strip():
            raise TeacherError(
                f"model {self.name} ({self.url}) returned a response without a model name or with "
                f"{len(data) if isinstance(data, list) else 'no'} embeddings for {len(inputs)} tiles. "
                "Check that the URL points at a server of the embeddings protocol.",
                value=len(data) if isinstance(data, list) else None,
                limit=len(inputs),
            )
        try:
            ordered = sorted(data, key=lambda item: item["index"])
            embeddings = np.array([item["embedding"] for item in ordered], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as error:
            raise TeacherError(
                f"model {self.name} ({self.url}) returned malformed embeddings ({type(error).__name__}: {error}). "
                "Check that the server implements the embeddings protocol."
            ) from error
        if [item["index"] for item in ordered] != list(range(len(inputs))) or embeddings.ndim != 2 or not np.isfinite(embeddings).all():
            raise TeacherError(
                f"model {self.name} ({self.url}) returned embeddings of shape {embeddings.shape} with indices that are not 0 to "
                f"{len(inputs) - 1}, or with values that are not finite. Check the server.",
                value=list(embeddings.shape),
            )
        checkpoint = body.get("checkpoint_sha256")
        encoder = f"{model} sha256:{checkpoint}" if isinstance(checkpoint, str) and checkpoint else model
        return embeddings, encoder

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send one embeddings request with retries and return its JSON body."""
        wait = self.retry_wait_s
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = self._http.post(EMBEDDINGS_PATH, json=payload)
            except httpx.TransportError as error:
                if attempt == self.max_attempts:
                    raise TeacherError(
                        f"model {self.name}: request to {self.url}{EMBEDDINGS_PATH} failed after {attempt} tries "
                        f"({type(error).__name__}: {error}). Check that the server runs and the URL is right.",
                        value=self.url,
                    ) from error
                logger.warning("model %s: request to %s failed (%s), try %d of %d", self.name, self.url, type(error).__name__, attempt, self.max_attempts)
            else:
                if response.status_code == 200:
                    self.requests += 1
                    return response.json()
                if response.status_code not in RETRY_STATUS_CODES or attempt == self.max_attempts:
                    raise self._response_error(response, attempt)
                wait = max(wait, _retry_after_seconds(response))
                logger.warning("model %s: %s returned HTTP %d, try %d of %d", self.name, self.url, response.status_code, attempt, self.max_attempts)
            time.sleep(min(wait, MAX_RETRY_WAIT_S))
            wait *= 2
        raise AssertionError("unreachable: the last try returns or raises")

    def _response_error(self, response: httpx.Response, attempts: int) -> TeacherError:
        try:
            error = response.json().get("error") or {}
            message = error.get("message") or response.text[:300]
        except (ValueError, AttributeError):
            message = response.text[:300]
        hint = ""
        if response.status_code == 401:
            hint = (
                f" Set the key in {api_key_variable(self.name)} or {API_KEY_ENV}."
                if self._api_key_source is None
                else f" The key from {self._api_key_source} was rejected."
            )
        return TeacherError(
            f"model {self.name}: {self.url}{EMBEDDINGS_PATH} returned HTTP {response.status_code} after {attempts} "
            f"{'try' if attempts == 1 else 'tries'}: {message}{hint}",
            value=response.status_code,
        )


@dataclass
class SlideExtraction:
    """One slide's outcome: its patch count (None when no model needed it), and by model name the feature file and whether this run embedded it."""

    name: str
    patches: int | None
    embedded: dict[str, bool]
    paths: dict[str, Path]


def feature_path(features_root: Path, model: str, slide_name: str) -> Path:
    """Return the patch feature file of ``slide_name`` for ``model``: ``FEATURES_ROOT/MODEL/SLIDE.h5``."""
    return Path(features_root) / model / f"{slide_name}.h5"


def extract_slide(
    source: SlideSource,
    clients: Sequence[EmbeddingsClient],
    features_root: Path,
    options: TileOptions,
    *,
    name: str | None = None,
    batch_size: int = 64,
) -> SlideExtraction:
    """Tile a slide once and write the patch features of every model in ``clients`` that has no file for it yet.

    ``name`` is the slide's output name (default: ``source.name``). Batches of ``batch_size`` tiles
    are read with ``options.read_workers`` threads and sent to each model in turn. Raises
    :class:`shared.errors.SlideError` for a slide that cannot be tiled and :class:`TeacherError` for a
    model that fails, and then writes no file for that slide and model.
    """
    name = name or source.name
    paths = {client.name: feature_path(features_root, client.name, name) for client in clients}
    pending = [client for client in clients if not paths[client.name].is_file()]
    if not pending:
        return SlideExtraction(name=name, patches=None, embedded=dict.fromkeys(paths, False), paths=paths)

    tiled = tile_slide(
        source.path,
        mpp=source.mpp,
        patch_size=options.patch_size,
        target_mpp=options.target_mpp,
        target_magnification=options.target_magnification,
        overlap=options.overlap,
        min_tissue_fraction=options.min_tissue_fraction,
        edge=options.edge,
        min_area_um2=options.min_area_um2,
        fill_holes=options.fill_holes,
        remove_artefacts=options.remove_artefacts,
        allow_fluorescence=options.allow_fluorescence,
        drop_blurry=options.drop_blurry,
        workers=options.read_workers,
    )
    parts: dict[str, list[np.ndarray]] = {client.name: [] for client in pending}
    encoders: dict[str, set[str]] = {client.name: set() for client in pending}
    with open_slide(source.path, mpp=source.mpp) as slide:
        for coords, tiles in iter_tiles(slide, tiled.grid, batch_size=batch_size, workers=options.read_workers):
            for client in pending:
                embeddings, encoder = client.embed(tiles, slide_id=tiled.info.slide_id, coords=coords, mpp=tiled.grid.target_mpp)
                parts[client.name].append(embeddings)
                encoders[client.name].add(encoder)

    for client in pending:
        _write_model_features(paths[client.name], tiled, client, parts[client.name], encoders[client.name])
    logger.info("slide %s: %d patches sent to %s", name, len(tiled.grid), ", ".join(client.name for client in pending))
    return SlideExtraction(
        name=name,
        patches=len(tiled.grid),
        embedded={model: any(client.name == model for client in pending) for model in paths},
        paths=paths,
    )


def pool_model_features(features_root: Path, pooled_root: Path, models: Sequence[str], slide_names: Sequence[str], *, method: str = "mean") -> dict[str, Path]:
    """Pool every model's patch feature files of ``slide_names`` into ``POOLED_ROOT/MODEL/SLIDE.h5`` and return the model folders.

    Pooling is cheap, so every file is pooled again on every run and always follows ``method``.
    """
    folders = {}
    for model in models:
        folder = Path(pooled_root) / model
        for slide_name in slide_names:
            pool_slide_file(feature_path(features_root, model, slide_name), folder / f"{slide_name}.h5", method=method)
        folders[model] = folder
    return folders


def check_encoders(features_root: Path, models: Sequence[str], slide_names: Sequence[str]) -> dict[str, str]:
    """Return each model's encoder identity, raising :class:`ConfigError` when its feature files name several.

    Files of an earlier run against another checkpoint are the usual cause, and the message lists them.
    """
    identities = {}
    for model in models:
        by_encoder: dict[str, list[str]] = {}
        for slide_name in slide_names:
            encoder = str(read_features(feature_path(features_root, model, slide_name)).attrs.get("encoder"))
            by_encoder.setdefault(encoder, []).append(slide_name)
        if len(by_encoder) > 1:
            listing = "; ".join(f"{encoder}: {len(names)} slides (first {names[0]})" for encoder, names in by_encoder.items())
            raise ConfigError(
                f"model {model}: the feature files under {Path(features_root) / model} come from {len(by_encoder)} encoders ({listing}), "
                "so the server changed model between runs. Delete the files of the old encoder and run the command again.",
                value=sorted(by_encoder),
            )
        identities[model] = next(iter(by_encoder))
    return identities


def _write_model_features(path: Path, tiled: TiledSlide, client: EmbeddingsClient, parts: list[np.ndarray], encoders: set[str]) -> None:
    if len(encoders) != 1:
        raise TeacherError(
            f"model {client.name} ({client.url}) returned the model names {sorted(encoders)} within slide {tiled.info.name}, so its model "
            "changed midway. Run the command again once the server serves one model.",
            value=sorted(encoders),
        )
    features = np.concatenate(parts, axis=0)
    widths = {part.shape[1] for part in parts}
    if len(widths) != 1:
        raise TeacherError(f"model {client.name} returned embeddings of widths {sorted(widths)} within one slide.", value=sorted(widths))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_features(path, coords=tiled.grid.coords, features=features, attrs=trident_attrs(tiled.info, tiled.grid, encoder=encoders.pop()))


def _retry_after_seconds(response: httpx.Response) -> float:
    """Return the numeric ``Retry-After`` of a response in seconds, or 0 when it is absent or a date."""
    try:
        seconds = float(response.headers.get("retry-after", "0"))
    except ValueError:
        return 0.0
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


def describe_endpoints(clients: Mapping[str, EmbeddingsClient], encoders: Mapping[str, str]) -> dict[str, str]:
    """Return ``{"model NAME": "encoder ..., served on HOST"}`` for the report's task description.

    Only the host is named: a local port or a URL path means nothing to a reader of the report.
    """
    return {
        f"model {name}": f"encoder {encoders.get(name, 'unknown')}, served on {urlsplit(client.url).hostname or client.url}"
        for name, client in clients.items()
    }


def record_model_info(features_root: Path, client: EmbeddingsClient, encoder: str) -> dict[str, Any]:
    """Return the parameter count and measured throughput of ``client``'s model, storing them in ``MODEL/model-info.json``.

    The keys are those of a ``--model-info`` file. A run that sent the model tiles measures its
    throughput and replaces the file. A run that sent none keeps the throughput stored for the same
    ``encoder``, since the feature files it benchmarks came from that run. The parameter count comes
    from the server's ``GET /v1/models``, or from the file when the server does not list it.
    """
    path = Path(features_root) / client.name / MODEL_INFO_FILE
    parameters = client.model_parameters(encoder)
    throughput = client.throughput()
    if throughput is not None:
        info = {"parameters": parameters, "throughput_tiles_per_s": throughput, "throughput_note": client.throughput_note()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**info, "encoder": encoder}, indent=2) + "\n", encoding="utf-8")
        return info

    stored = _read_stored_info(path, encoder)
    return {
        "parameters": parameters if parameters is not None else stored.get("parameters"),
        "throughput_tiles_per_s": stored.get("throughput_tiles_per_s"),
        "throughput_note": stored.get("throughput_note"),
    }


def _read_stored_info(path: Path, encoder: str) -> dict[str, Any]:
    """Return the values stored in ``path`` for ``encoder``, or {} when the file is missing, unreadable or from another encoder."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.warning("cannot read %s (%s), so the throughput it stored is not reported", path, error)
        return {}
    if not isinstance(stored, dict) or stored.get("encoder") != encoder:
        logger.warning("%s was written for another encoder than %s, so the throughput it stored is not reported", path, encoder)
        return {}
    types = {"parameters": int, "throughput_tiles_per_s": (int, float), "throughput_note": str}
    return {key: stored[key] for key, expected in types.items() if isinstance(stored.get(key), expected) and not isinstance(stored[key], bool)}
