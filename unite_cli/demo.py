"""``unite demo``: the real chain on one real slide, from tiles to a served student.

The steps: tile the slide, then start the teacher gateway on 127.0.0.1 and fill its cache through the HTTP
API. Export training shards from the cache and distill the student. Finally, start the student server on
the new checkpoint, embed the slide through its HTTP API and write the features in TRIDENT's layout.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from shared.errors import UniteError
from shared.features import trident_attrs, write_features
from shared.sample_data import default_data_dir, fetch_cmu1
from shared.slides.reader import open_slide
from unite_cli.background import running_server
from unite_cli.pipeline import teach_slides, tile_to_patch_files

logger = logging.getLogger(__name__)

SLIDE_EMBED_TIMEOUT_S = 1800.0
# Seconds between two polls of a slide job's status.
SLIDE_POLL_S = 0.5


@contextmanager
def _timed(timings: dict[str, float], step: str):
    logger.info("demo step: %s", step)
    started = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - started


def run_demo(*, slide: Path | None, mpp: float | None, out_dir: Path, epochs: int, batch_size: int) -> dict:
    """Run the demo and print what it did; return the figures it printed."""
    from distiller.train import DistillConfig, distill
    from student_server.app import create_app as create_student_app
    from student_server.settings import StudentSettings
    from teacher_gateway.app import create_app as create_gateway_app
    from teacher_gateway.settings import GatewaySettings

    timings: dict[str, float] = {}
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    with _timed(timings, "get the slide"):
        slide = Path(slide) if slide is not None else fetch_cmu1(default_data_dir())

    with _timed(timings, "tile"):
        patch_file = tile_to_patch_files([slide], out_dir, mpp=mpp, patch_size=224, target_mpp=0.5)[0]

    cache_dir, shard_dir = out_dir / "cache", out_dir / "shards"
    gateway_app = create_gateway_app(GatewaySettings(cache_dir=cache_dir, teacher="reference"))
    with _timed(timings, "fill the teacher cache over HTTP"), running_server(gateway_app) as gateway_url:
        taught = teach_slides([slide], gateway_url=gateway_url, cache_dir=cache_dir, shard_dir=shard_dir, mpp=mpp)
    if taught.failed:
        # teach_slides records a failed slide and goes on, but the demo has no other slide to go on with.
        raise UniteError(taught.failed[0].message)

    distill_dir = out_dir / "distill"
    shutil.rmtree(distill_dir / "lightning", ignore_errors=True)
    with _timed(timings, "distill"):
        trained = distill(
            DistillConfig(shard_dir=shard_dir, out_dir=distill_dir, epochs=epochs, batch_size=batch_size),
            # The bar is drawn on stderr, so stdout carries only the summary below.
            progress=sys.stderr.isatty(),
            command=f"unite demo --epochs {epochs} --batch-size {batch_size}",
        )

    student_app = create_student_app(StudentSettings(checkpoint_dir=trained.checkpoint_dir, upload_dir=out_dir / "uploads", jobs_dir=out_dir / "jobs"))
    with _timed(timings, "embed the slide over HTTP"), running_server(student_app) as student_url:
        answer = _embed_slide(student_url, slide, mpp)

    features = np.asarray(answer["patch_embeddings"], dtype=np.float32)
    coords = np.asarray(answer["coords"], dtype=np.int64)
    slide_embedding = np.asarray(answer["slide_embedding"], dtype=np.float32)
    with open_slide(slide, mpp=mpp) as opened:
        info = opened.info
    features_path = write_features(
        out_dir / "features" / f"{info.name}.h5",
        coords=coords,
        features=features,
        attrs=trident_attrs(info, taught.slides[0].grid, encoder=answer["model"]),
    )

    figures = {
        "slide": str(slide),
        "patches": int(len(coords)),
        "patch_embeddings_shape": list(features.shape),
        "slide_embedding_shape": list(slide_embedding.shape),
        "first_loss": trained.first_loss,
        "last_loss": trained.last_loss,
        "checkpoint_sha256": answer["checkpoint_sha256"],
    }
    _print_summary(figures, taught, trained, timings, patch_file, features_path, out_dir)
    return figures


def _embed_slide(student_url: str, slide: Path, mpp: float | None) -> dict:
    """Submit the slide as a job of the student server, wait for it, and return its result with the patches."""
    data = {"include_patches": "true"}
    if mpp is not None:
        data["mpp"] = str(mpp)
    with httpx.Client(base_url=student_url, timeout=60.0) as client:
        with slide.open("rb") as handle:
            response = client.post("/v1/slides", files={"file": ("slide" + slide.suffix, handle)}, data=data)
        if response.status_code != 202:
            raise UniteError(f"student server rejected the slide: HTTP {response.status_code}: {response.text[:500]}")
        job_url = response.headers["location"]

        deadline = time.monotonic() + SLIDE_EMBED_TIMEOUT_S
        job = response.json()
        while job["status"] in ("queued", "running"):
            if time.monotonic() > deadline:
                raise UniteError(f"the student server's slide job {job['id']} did not finish within {SLIDE_EMBED_TIMEOUT_S:.0f} s.")
            time.sleep(SLIDE_POLL_S)
            job = client.get(job_url).raise_for_status().json()
        if job["status"] != "succeeded":
            raise UniteError(f"the student server failed to embed the slide (job {job['status']}): {job['error']}")
        return client.get(job["links"]["result"]).raise_for_status().json()


def _print_summary(figures, taught, trained, timings, patch_file, features_path, out_dir) -> None:
    lines = [
        "",
        "UNITE demo finished",
        f"  slide                  {figures['slide']}",
        f"  patches                {figures['patches']} of 224 px at 0.5 µm/px (patch file {patch_file})",
        f"  teacher                {taught.teacher}: {taught.teacher_tiles} tiles embedded, {taught.cache_hits} from the cache",
        f"  training               {trained.train_tiles} train and {trained.val_tiles} validation tiles ({trained.split_description})",
        f"  loss                   first {figures['first_loss']:.4f}, last {figures['last_loss']:.4f}",
        f"  patch embeddings       {tuple(figures['patch_embeddings_shape'])}",
        f"  slide embedding        {tuple(figures['slide_embedding_shape'])} (mean of the patch embeddings)",
        f"  served checkpoint      sha256 {figures['checkpoint_sha256']}",
        f"  student checkpoint     {trained.checkpoint_dir}",
        f"  slide features         {features_path}",
        f"  outputs                {out_dir}",
        "  timings (s)            " + ", ".join(f"{step} {seconds:.1f}" for step, seconds in timings.items()),
    ]
    print("\n".join(lines))
