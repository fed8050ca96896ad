"""Helpers for the student server tests: a tiny exported student, real tiles, requests and metrics."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from shared.checkpoint import load_student, save_student
from shared.imaging import decode_image, encode_base64_png
from shared.models.inference import embed_tiles
from shared.models.student import UNITE_STUDENT_KWARGS, build_unite_student

# One transformer block instead of twelve: the same architecture and output width, a fraction of the compute.
TINY_KWARGS = {**UNITE_STUDENT_KWARGS, "depth": 1}


def save_tiny_student(folder: Path, *, seed: int) -> Path:
    """Export a one-block UNITE student with random weights drawn from ``seed`` into ``folder``."""
    torch.manual_seed(seed)
    return save_student(
        build_unite_student(depth=1),
        folder,
        architecture="unite-vit-small-14",
        architecture_kwargs=TINY_KWARGS,
        teacher="test-teacher/v1",
        teacher_licence="test",
        training={"seed": seed},
    )


def lung_tiles(shared_data: Path, count: int) -> np.ndarray:
    """Return ``count`` real 224 x 224 lung tiles as an (N, 224, 224, 3) uint8 array."""
    paths = sorted((shared_data / "tiles" / "lc25000_lung_dedup" / "lung_aca").glob("*.jpeg"))[:count]
    return np.stack([decode_image(path.read_bytes()) for path in paths])


def direct_embeddings(checkpoint: Path, tiles: np.ndarray) -> tuple[str, np.ndarray]:
    """Return the checkpoint's sha256 and its embeddings of ``tiles``, computed without the server."""
    student = load_student(checkpoint)
    return student.sha256, embed_tiles(student.model, tiles, batch_size=len(tiles))


def embeddings_body(tiles: np.ndarray) -> dict:
    return {"input": [{"image": encode_base64_png(tile)} for tile in tiles]}


def post_embeddings(client: httpx.Client, tiles: np.ndarray, **kwargs) -> httpx.Response:
    return client.post("/v1/embeddings", json=embeddings_body(tiles), **kwargs)


def response_embeddings(response: httpx.Response) -> np.ndarray:
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def scrape(client: httpx.Client, **kwargs) -> dict[str, float]:
    """Return every sample of ``GET /metrics`` as ``{'name{label="value",...}': value}``."""
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
