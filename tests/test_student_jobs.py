"""Slide jobs of the student server over real HTTP on 127.0.0.1: submit, poll, results, limits and resume.

The slides are real (CMU-1-Small-Region, a BRACS crop and a DAPI fluorescence NDPI from the shared test
data), the student is a real export with one transformer block, and every job runs the real slide pipeline.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import zipfile
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
from job_helpers import job_folders, job_settings, save_tiny_student, wait_for_job
from PIL import Image
from servers import run_app

from shared.slides.tiling import tile_slide
from student_server.app import create_app

CMU1 = "CMU-1-Small-Region.svs"
DAPI = "test3-DAPI-2.ndpi"
BRACS = "BRACS_1640_N_3_cropped.tiff"
CLIENT_NAME = "Doe-Jane-1970-biopsy.svs"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("checkpoint") / "student")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, slides_dir) -> Path:
    root = tmp_path_factory.mktemp("data-root")
    (root / "slides").mkdir()
    shutil.copy(slides_dir / BRACS, root / "slides" / BRACS)
    return root


@pytest.fixture(scope="module")
def server(checkpoint, data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    settings = job_settings(checkpoint, root, data_root=data_root, max_upload_bytes=10_000_000)
    app = create_app(settings)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        yield client, settings


@pytest.fixture()
def client(server) -> httpx.Client:
    return server[0]


def submit_upload(client: httpx.Client, path: Path, *, name: str = CLIENT_NAME, **fields) -> httpx.Response:
    with path.open("rb") as handle:
        return client.post("/v1/slides", files={"file": (name, handle)}, data=fields)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return error


# Uploads


def test_upload_job_runs_to_success(server, slides_dir, caplog):
    client, settings = server
    with caplog.at_level(logging.DEBUG):
        response = submit_upload(client, slides_dir / CMU1, pooling="mean")

        assert response.status_code == 202, response.text
        submitted = response.json()
        job_id = submitted["id"]
        assert submitted["status"] == "queued"
        assert response.headers["location"] == f"/v1/jobs/{job_id}"
        assert submitted["links"]["self"] == f"/v1/jobs/{job_id}"

        job, seen = wait_for_job(client, job_id)

    tiled = tile_slide(slides_dir / CMU1)
    patches = len(tiled.grid.coords)
    assert job["status"] == "succeeded", job
    assert job["error"] is None
    assert job["num_patches"] == patches
    assert job["slide_id"] == tiled.info.slide_id
    assert job["progress"] == {"done": patches, "total": patches, "fraction": 1.0}
    assert job["started"] is not None
    assert job["finished"] >= job["started"] >= job["created"]
    dones = [state["progress"]["done"] for state in seen]
    assert dones == sorted(dones)

    # The uploaded file is deleted once the job finished, and its client-side name is never kept.
    folder = settings.jobs_dir / job_id
    assert sorted(path.name for path in folder.iterdir()) == ["job.json", "outputs"]
    assert CLIENT_NAME not in (folder / "job.json").read_text()
    assert "Doe-Jane" not in caplog.text
    assert list(settings.upload_dir.iterdir()) == []


def test_features_h5_equals_result(client, slides_dir, tmp_path):
    job_id = submit_upload(client, slides_dir / CMU1, include_patches="true").json()["id"]
    job, _ = wait_for_job(client, job_id)
    assert job["status"] == "succeeded", job

    result = client.get(f"/v1/jobs/{job_id}/result")
    assert result.status_code == 200, result.text
    answer = result.json()
    download = client.get(f"/v1/jobs/{job_id}/features.h5")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/x-hdf5"
    assert f'filename="{job["slide_id"]}.h5"' in download.headers["content-disposition"]
    path = tmp_path / "features.h5"
    path.write_bytes(download.content)

    with h5py.File(path, "r") as file:
        coords = file["coords"][()]
        features = file["features"][()]
        attrs = dict(file.attrs)
        coords_attrs = dict(file["coords"].attrs)
    tiled = tile_slide(slides_dir / CMU1)
    assert coords.dtype == np.int64
    assert coords.shape == (job["num_patches"], 2)
    assert features.dtype == np.float32
    assert features.shape == (job["num_patches"], 384)
    np.testing.assert_array_equal(coords, tiled.grid.coords)
    assert attrs["encoder"] == f"{answer['model']} sha256:{answer['checkpoint_sha256']}"
    assert coords_attrs["patch_size_level0"] == tiled.grid.patch_size_level0
    assert coords_attrs["target_magnification"] == 20

    np.testing.assert_array_equal(np.asarray(answer["coords"], dtype=np.int64), coords)
    np.testing.assert_array_equal(np.asarray(answer["patch_embeddings"], dtype=np.float32), features)
    slide_embedding = np.asarray(answer["slide_embedding"], dtype=np.float32)
    np.testing.assert_allclose(slide_embedding, features.mean(axis=0), rtol=0, atol=1e-6)
    assert answer["pooling"] == "mean"
    assert answer["num_patches"] == job["num_patches"]
    assert answer["checkpoint_sha256"] == client.get("/readyz").json()["checkpoint_sha256"]

    without = client.get(f"/v1/jobs/{job_id}/result", params={"include_patches": "false"}).json()
    assert "patch_embeddings" not in without
    assert without["slide_embedding"] == answer["slide_embedding"]


def test_images_and_map_of_job(client, slides_dir):
    job_id = submit_upload(client, slides_dir / CMU1).json()["id"]
    job, _ = wait_for_job(client, job_id)

    for name in ("overlay.jpg", "thumbnail.jpg"):
        response = client.get(f"/v1/jobs/{job_id}/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "JPEG"
        assert min(image.size) > 0

    embedding_map = client.get(f"/v1/jobs/{job_id}/map").json()
    assert embedding_map["method"] == "pca"
    assert len(embedding_map["points"]) == job["num_patches"]
    assert embedding_map["clusters"] == min(8, job["num_patches"])
    assert set(embedding_map["points"][0]) == {"x", "y", "px", "py", "cluster"}


def test_zip_renamed_svs_fails_job(client):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "these are notes, not a slide")

    response = client.post("/v1/slides", files={"file": ("Smith-John.svs", buffer.getvalue())})

    assert response.status_code == 202, response.text
    job, _ = wait_for_job(client, response.json()["id"])
    assert job["status"] == "failed"
    error = job["error"]
    assert error["code"] == "invalid_slide"
    assert error["reason"] in ("unreadable", "damaged")
    assert "uploaded slide" in error["message"]
    assert "/tmp" not in json.dumps(error)
    assert "slide.svs" not in json.dumps(error)
    assert "Smith-John" not in json.dumps(error)

    result = assert_error(client.get(f"/v1/jobs/{job['id']}/result"), 409, "job_not_finished")
    assert "failed" in result["message"]


def test_empty_upload_422_leaves_no_file(server):
    client, settings = server
    before = job_folders(settings.jobs_dir)

    response = client.post("/v1/slides", files={"file": ("empty.svs", b"")})

    error = assert_error(response, 422, "invalid_request")
    assert "empty" in error["message"]
    assert job_folders(settings.jobs_dir) == before
    assert list(settings.upload_dir.iterdir()) == []


def test_invalid_pooling_422(client, slides_dir):
    response = submit_upload(client, slides_dir / CMU1, pooling="median")

    error = assert_error(response, 422, "invalid_request")
    assert "pooling" in error["message"]


def test_unsupported_content_type_422(client):
    response = client.post("/v1/slides", content=b"path=slides/a.svs", headers={"content-type": "text/plain"})

    error = assert_error(response, 422, "invalid_request")
    assert "multipart/form-data" in error["message"]
    assert "application/json" in error["message"]


def test_unknown_job_404(client):
    for path in ("/v1/jobs/0123456789abcdef0123456789abcdef", "/v1/jobs/../../etc/passwd", "/v1/jobs/nothex/result"):
        response = client.get(path)
        assert response.status_code == 404, path


def test_delete_finished_job(server, data_root):
    client, settings = server
    job_id = client.post("/v1/slides", json={"path": f"slides/{BRACS}", "mpp": 0.5}).json()["id"]
    wait_for_job(client, job_id)

    response = client.delete(f"/v1/jobs/{job_id}")

    assert response.status_code == 204
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert not (settings.jobs_dir / job_id).exists()
    assert (data_root / "slides" / BRACS).is_file()
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 404


# Paths under the data root


def test_path_job_under_data_root(client):
    response = client.post("/v1/slides", json={"path": f"slides/{BRACS}", "mpp": 0.5, "pooling": "mean+max"})

    assert response.status_code == 202, response.text
    job, _ = wait_for_job(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["options"] == {"mpp": 0.5, "pooling": "mean+max", "include_patches": False, "allow_fluorescence": False}
    answer = client.get(job["links"]["result"]).json()
    assert answer["pooling"] == "mean+max"
    assert len(answer["slide_embedding"]) == 768
    assert answer["metadata"]["mpp_source"] == "override"


def test_path_job_without_mpp_fails_naming_field(client, data_root):
    # This TIFF reports an absurd resolution, so it needs the mpp override.
    job_id = client.post("/v1/slides", json={"path": f"slides/{BRACS}"}).json()["id"]
    job, _ = wait_for_job(client, job_id)

    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_slide"
    assert "'mpp'" in job["error"]["message"]
    assert f"slides/{BRACS}" in job["error"]["message"]
    assert str(data_root) not in json.dumps(job["error"])


def test_fluorescence_upload_fails_naming_field(client, slides_dir):
    job_id = submit_upload(client, slides_dir / DAPI, name="dapi.ndpi").json()["id"]
    job, _ = wait_for_job(client, job_id)

    assert job["status"] == "failed"
    assert job["error"]["reason"] == "not_brightfield"
    message = job["error"]["message"]
    assert "the field 'allow_fluorescence': true of POST /v1/slides" in message
    assert "--allow-fluorescence" not in message
    assert "allow_fluorescence=True" not in message


def test_fluorescence_upload_allowed_succeeds(client, slides_dir):
    response = submit_upload(client, slides_dir / DAPI, name="dapi.ndpi", allow_fluorescence="true")

    assert response.status_code == 202, response.text
    assert response.json()["options"]["allow_fluorescence"] is True
    job, _ = wait_for_job(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["num_patches"] == len(tile_slide(slides_dir / DAPI, allow_fluorescence=True).grid)
    answer = client.get(job["links"]["result"]).json()
    assert answer["metadata"]["illumination"] == "fluorescence"


def test_path_job_takes_allow_fluorescence_key(client):
    response = client.post("/v1/slides", json={"path": f"slides/{BRACS}", "mpp": 0.5, "allow_fluorescence": True})

    assert response.status_code == 202, response.text
    job, _ = wait_for_job(client, response.json()["id"])
    # The option only lets fluorescence slides through, so this brightfield slide is embedded as before.
    assert job["status"] == "succeeded", job
    assert job["options"]["allow_fluorescence"] is True
    assert client.get(job["links"]["result"]).json()["metadata"]["illumination"] == "brightfield"


def test_invalid_allow_fluorescence_422(client, slides_dir):
    response = submit_upload(client, slides_dir / DAPI, allow_fluorescence="perhaps")

    error = assert_error(response, 422, "invalid_request")
    assert "allow_fluorescence" in error["message"]


@pytest.mark.parametrize("escape", ["../outside.svs", "../missing.svs", "slides/../../outside.svs", "link-out.svs", "absolute"])
def test_path_outside_data_root_403(client, data_root, escape, tmp_path_factory):
    outside = data_root.parent / "outside.svs"
    outside.write_bytes(b"a file outside the data root")
    link = data_root / "link-out.svs"
    if not link.is_symlink():
        link.symlink_to(outside)
    requested = str(outside) if escape == "absolute" else escape

    response = client.post("/v1/slides", json={"path": requested})

    error = assert_error(response, 403, "path_forbidden")
    assert "UNITE_STUDENT_DATA_ROOT" in error["message"]
    assert str(data_root) not in response.text
    # The response is the same whether or not the file outside exists.
    assert "exist" not in error["message"]


def test_missing_path_under_data_root_422(client, data_root):
    response = client.post("/v1/slides", json={"path": "slides/missing.svs"})

    error = assert_error(response, 422, "invalid_slide")
    assert error["reason"] == "not_found"
    assert "'slides/missing.svs'" in error["message"]
    assert str(data_root) not in response.text


def test_path_without_data_root_403(checkpoint, tmp_path):
    app = create_app(job_settings(checkpoint, tmp_path))
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        response = client.post("/v1/slides", json={"path": "slides/a.svs"})

    error = assert_error(response, 403, "path_forbidden")
    assert "UNITE_STUDENT_DATA_ROOT is not set" in error["message"]
    assert error["limit"] == "UNITE_STUDENT_DATA_ROOT"
    assert job_folders(tmp_path / "jobs") == []


# Limits


def test_upload_over_limit_413_leaves_no_file(checkpoint, slides_dir, tmp_path):
    settings = job_settings(checkpoint, tmp_path, max_upload_bytes=100_000)
    data = (slides_dir / CMU1).read_bytes()
    boundary = "unite-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.svs"\r\n\r\n'.encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def chunks():
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    app = create_app(settings)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        declared = submit_upload(client, slides_dir / CMU1)
        # Without a Content-Length the limit is enforced while the file part streams to disk.
        streamed = client.post("/v1/slides", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})

    for response in (declared, streamed):
        error = assert_error(response, 413, "upload_too_large")
        assert error["limit"] == 100_000
        assert "UNITE_STUDENT_MAX_UPLOAD_BYTES" in error["message"]
    assert 100_000 < streamed.json()["error"]["value"] < len(data)
    assert list(settings.upload_dir.iterdir()) == []
    assert job_folders(settings.jobs_dir) == []


def test_queue_full_503_with_retry_after(checkpoint, data_root, tmp_path):
    settings = job_settings(checkpoint, tmp_path, data_root=data_root, max_queued_slide_jobs=1, retry_after_s=7)
    app = create_app(settings)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        # One job runs and one waits, so the third is turned away unless the first finished in between.
        responses = [client.post("/v1/slides", json={"path": f"slides/{BRACS}", "mpp": 0.5}) for _ in range(4)]
        statuses = [response.status_code for response in responses]
        rejected = [response for response in responses if response.status_code == 503]

        assert statuses[:2] == [202, 202]
        assert rejected, statuses
        error = assert_error(rejected[0], 503, "job_queue_full")
        assert rejected[0].headers["retry-after"] == "7"
        assert error["limit"] == 1
        assert "UNITE_STUDENT_MAX_QUEUED_SLIDE_JOBS" in error["message"]

        # The upload of a rejected multipart submission is never received.
        for _ in range(10):
            if client.post("/v1/slides", json={"path": f"slides/{BRACS}", "mpp": 0.5}).status_code == 503:
                break
        rejected_upload = client.post("/v1/slides", files={"file": ("a.svs", b"x" * 1000)})
        assert_error(rejected_upload, 503, "job_queue_full")
        assert list(settings.upload_dir.glob("*")) == []

        for response in responses:
            if response.status_code == 202:
                job, _ = wait_for_job(client, response.json()["id"])
                assert job["status"] == "succeeded", job


# Stop and resume


@pytest.mark.parametrize("killed", [False, True], ids=["stopped", "killed"])
def test_stopped_job_resumes_at_next_start(checkpoint, slides_dir, tmp_path, killed):
    # Batches of one tile give the stop many chances to land while the job runs.
    settings = job_settings(checkpoint, tmp_path, batch_size=1, shutdown_grace_s=20.0)
    with run_app(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        job_id = submit_upload(client, slides_dir / CMU1).json()["id"]
        job, _ = wait_for_job(client, job_id, statuses=("running",))
        while job["progress"]["done"] < 2:
            job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "running"
        assert job["progress"]["done"] < job["progress"]["total"]
        assert_error(client.get(f"/v1/jobs/{job_id}/result"), 409, "job_not_finished")
        assert_error(client.delete(f"/v1/jobs/{job_id}"), 409, "job_not_finished")

    record = json.loads((settings.jobs_dir / job_id / "job.json").read_text())
    assert record["status"] == "interrupted"
    assert record["attempts"] == 1
    assert (settings.jobs_dir / job_id / record["slide"]).is_file()
    assert not (settings.jobs_dir / job_id / "outputs" / "result.json").exists()
    if killed:
        # A killed server leaves its running jobs recorded as running.
        record["status"] = "running"
        (settings.jobs_dir / job_id / "job.json").write_text(json.dumps(record))

    with run_app(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        job, _ = wait_for_job(client, job_id)
        assert job["status"] == "succeeded", job
        assert job["num_patches"] == job["progress"]["total"]
        assert client.get(f"/v1/jobs/{job_id}/result").status_code == 200

    record = json.loads((settings.jobs_dir / job_id / "job.json").read_text())
    assert record["attempts"] == 2
