"""API keys of the student server over real HTTP: the API docs routes and slide jobs tied to their key."""

from __future__ import annotations

import json
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from job_helpers import job_settings, save_tiny_student, wait_for_job
from servers import run_app

from shared.api_keys import hash_key
from student_server.app import create_app

BRACS = "BRACS_1640_N_3_cropped.tiff"
KEY_A = "student-key-a-0123456789abcdef"
KEY_B = "student-key-b-fedcba9876543210"
DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")
# Every route that reads one job, as GET requests, relative to /v1/jobs/{id}.
JOB_READ_SUFFIXES = ("", "/result", "/features.h5", "/overlay.jpg", "/thumbnail.jpg", "/map")
UNKNOWN_JOB = "0123456789abcdef0123456789abcdef"


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
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(f"[[keys]]\nname = 'lab-a'\nsha256 = '{hash_key(KEY_A)}'\n\n[[keys]]\nname = 'lab-b'\nsha256 = '{hash_key(KEY_B)}'\n")
    return path


def key(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@contextmanager
def student_server(settings):
    with run_app(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


def submit_path_job(client: httpx.Client, **kwargs) -> str:
    response = client.post("/v1/slides", json={"path": f"slides/{BRACS}", "mpp": 0.5}, **kwargs)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_with_key(client: httpx.Client, job_id: str, api_key: str) -> dict:
    """Poll the job with ``api_key`` until it finished, and return its last state."""
    with httpx.Client(base_url=client.base_url, headers=key(api_key), timeout=60) as keyed:
        job, _ = wait_for_job(keyed, job_id)
    return job


def listed_ids(client: httpx.Client, **kwargs) -> list[str]:
    response = client.get("/v1/jobs", **kwargs)
    assert response.status_code == 200, response.text
    return [job["id"] for job in response.json()["data"]]


def not_found_error(response: httpx.Response, job_id: str) -> dict:
    """Return the 404 error of ``response`` with the job id replaced, to compare it with an unknown id's error."""
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    return {name: value.replace(job_id, "ID") if isinstance(value, str) else value for name, value in error.items()}


# API docs


def test_api_docs_need_key_with_keys_file(checkpoint, keys_file, tmp_path):
    settings = job_settings(checkpoint, tmp_path, keys_file=keys_file)
    with student_server(settings) as client:
        without_key = {path: client.get(path) for path in DOCS_PATHS}
        wrong_key = {path: client.get(path, headers=key(KEY_A + "x")) for path in DOCS_PATHS}
        with_key = {path: client.get(path, headers={"X-API-Key": KEY_A}) for path in DOCS_PATHS}

    for path in DOCS_PATHS:
        assert without_key[path].status_code == 401, path
        assert without_key[path].json()["error"]["code"] == "unauthorized", path
        assert wrong_key[path].status_code == 401, path
        assert with_key[path].status_code == 200, path
    paths = with_key["/openapi.json"].json()["paths"]
    assert "/v1/slides" in paths
    assert "/v1/jobs" in paths
    assert "/docs" not in paths
    assert "swagger" in with_key["/docs"].text.lower()


@pytest.mark.parametrize(
    ("api_docs", "with_keys_file", "expected"),
    [("open", True, 200), ("off", True, 404), ("off", False, 404), ("key", False, 200)],
    ids=["open-keyed", "off-keyed", "off-no-keys", "key-no-keys"],
)
def test_api_docs_setting(checkpoint, keys_file, tmp_path, api_docs, with_keys_file, expected):
    settings = job_settings(checkpoint, tmp_path, keys_file=keys_file if with_keys_file else None, api_docs=api_docs)
    with student_server(settings) as client:
        without_key = {path: client.get(path).status_code for path in DOCS_PATHS}
        with_key = {path: client.get(path, headers=key(KEY_A)).status_code for path in DOCS_PATHS}

    assert without_key == dict.fromkeys(DOCS_PATHS, expected)
    assert with_key == dict.fromkeys(DOCS_PATHS, expected)


# Slide jobs and their key


@pytest.fixture(scope="module")
def keyed_server(checkpoint, data_root, keys_file, tmp_path_factory):
    """A server with two keys and one succeeded job of key A; yields the client, the settings and the job id."""
    settings = job_settings(checkpoint, tmp_path_factory.mktemp("keyed"), data_root=data_root, keys_file=keys_file)
    with student_server(settings) as client:
        job_id = submit_path_job(client, headers=key(KEY_A))
        job = wait_with_key(client, job_id, KEY_A)
        assert job["status"] == "succeeded", job
        yield client, settings, job_id


def test_job_records_key_name_only(keyed_server):
    _, settings, job_id = keyed_server

    text = (settings.jobs_dir / job_id / "job.json").read_text(encoding="utf-8")

    assert json.loads(text)["owner"] == "lab-a"
    assert KEY_A not in text
    assert hash_key(KEY_A) not in text


def test_owner_reads_job_and_results(keyed_server):
    client, _, job_id = keyed_server

    for suffix in JOB_READ_SUFFIXES:
        response = client.get(f"/v1/jobs/{job_id}{suffix}", headers=key(KEY_A))
        assert response.status_code == 200, (suffix, response.text)
    assert listed_ids(client, headers=key(KEY_A)) == [job_id]


def test_other_key_gets_unknown_job_404(keyed_server):
    client, _, job_id = keyed_server

    for suffix in JOB_READ_SUFFIXES:
        foreign = not_found_error(client.get(f"/v1/jobs/{job_id}{suffix}", headers=key(KEY_B)), job_id)
        unknown = not_found_error(client.get(f"/v1/jobs/{UNKNOWN_JOB}{suffix}", headers=key(KEY_B)), UNKNOWN_JOB)
        assert foreign == unknown, suffix
        assert foreign["code"] == "job_not_found", suffix
    assert listed_ids(client, headers=key(KEY_B)) == []


def test_other_key_cannot_delete_job(keyed_server):
    client, settings, job_id = keyed_server

    foreign = not_found_error(client.delete(f"/v1/jobs/{job_id}", headers=key(KEY_B)), job_id)
    unknown = not_found_error(client.delete(f"/v1/jobs/{UNKNOWN_JOB}", headers=key(KEY_B)), UNKNOWN_JOB)

    assert foreign == unknown
    assert (settings.jobs_dir / job_id / "job.json").is_file()
    assert client.get(f"/v1/jobs/{job_id}", headers=key(KEY_A)).status_code == 200


def test_job_routes_need_key(keyed_server):
    client, _, job_id = keyed_server

    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result", "/v1/jobs"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized", path


def test_job_list_limit(keyed_server):
    client, _, job_id = keyed_server

    response = client.get("/v1/jobs", params={"limit": 1}, headers=key(KEY_A))
    too_large = client.get("/v1/jobs", params={"limit": 100_000}, headers=key(KEY_A))

    assert response.status_code == 200, response.text
    assert [job["id"] for job in response.json()["data"]] == [job_id]
    assert response.json()["has_more"] is False
    assert too_large.status_code == 422, too_large.text


@pytest.mark.parametrize("limit", ["ten", "1.5", ""])
def test_job_list_limit_not_integer(keyed_server, limit):
    client, _, _ = keyed_server

    response = client.get("/v1/jobs", params={"limit": limit}, headers=key(KEY_A))

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    # The same range as for an integer out of range, taken from the parameter's schema.
    assert error["limit"] == [1, 1000]
    assert error["value"] == limit
    assert "limit" in error["message"]


@pytest.mark.parametrize("limit", [0, -1, 1001, 10**9])
def test_job_list_limit_out_of_range(keyed_server, limit):
    client, _, _ = keyed_server

    response = client.get("/v1/jobs", params={"limit": limit}, headers=key(KEY_A))

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["limit"] == [1, 1000]
    assert error["value"] == limit
    assert f"the query parameter limit is {limit}, expected 1 to 1000 jobs" in error["message"]


def test_rotated_key_keeps_name_jobs(keyed_server, tmp_path):
    _, settings, job_id = keyed_server
    # Jobs belong to the key's name, so a new key named lab-a reads lab-a's jobs and the old key under a new name does not.
    new_key = "student-key-a2-0123456789abcdef"
    rotated = tmp_path / "keys.toml"
    rotated.write_text(f"[[keys]]\nname = 'lab-a'\nsha256 = '{hash_key(new_key)}'\n\n[[keys]]\nname = 'lab-a-old'\nsha256 = '{hash_key(KEY_A)}'\n")
    shutil.copytree(settings.jobs_dir / job_id, tmp_path / "jobs" / job_id)

    with student_server(job_settings(settings.checkpoint_dir, tmp_path, keys_file=rotated)) as client:
        new_key_status = client.get(f"/v1/jobs/{job_id}", headers=key(new_key)).status_code
        new_key_list = listed_ids(client, headers=key(new_key))
        old_key_status = client.get(f"/v1/jobs/{job_id}", headers=key(KEY_A)).status_code
        old_key_list = listed_ids(client, headers=key(KEY_A))

    assert new_key_status == 200
    assert new_key_list == [job_id]
    assert old_key_status == 404
    assert old_key_list == []


def test_owner_deletes_own_job(checkpoint, data_root, keys_file, tmp_path):
    settings = job_settings(checkpoint, tmp_path, data_root=data_root, keys_file=keys_file)
    with student_server(settings) as client:
        job_id = submit_path_job(client, headers=key(KEY_B))
        wait_with_key(client, job_id, KEY_B)
        deleted = client.delete(f"/v1/jobs/{job_id}", headers=key(KEY_B))
        after = client.get(f"/v1/jobs/{job_id}", headers=key(KEY_B))

    assert deleted.status_code == 204, deleted.text
    assert after.status_code == 404
    assert not (settings.jobs_dir / job_id).exists()


def copy_as_ownerless_record(jobs_dir: Path, job_id: str) -> str:
    """Copy a finished job's folder under a new id, with a job.json that has no owner field, as older servers wrote it."""
    new_id = uuid.uuid4().hex
    shutil.copytree(jobs_dir / job_id, jobs_dir / new_id)
    record = json.loads((jobs_dir / new_id / "job.json").read_text(encoding="utf-8"))
    record["id"] = new_id
    del record["owner"]
    (jobs_dir / new_id / "job.json").write_text(json.dumps(record), encoding="utf-8")
    return new_id


def test_ownerless_jobs_across_key_modes(checkpoint, data_root, keys_file, tmp_path):
    without_keys = job_settings(checkpoint, tmp_path, data_root=data_root)
    with_keys = job_settings(checkpoint, tmp_path, data_root=data_root, keys_file=keys_file)

    with student_server(without_keys) as client:
        anonymous_job = submit_path_job(client)
        assert wait_for_job(client, anonymous_job)[0]["status"] == "succeeded"
    assert json.loads((tmp_path / "jobs" / anonymous_job / "job.json").read_text())["owner"] == "anonymous"
    old_job = copy_as_ownerless_record(tmp_path / "jobs", anonymous_job)

    # A server with keys shows neither job to any key, and shows a key's job to that key only.
    with student_server(with_keys) as client:
        keyed_job = submit_path_job(client, headers=key(KEY_A))
        assert wait_with_key(client, keyed_job, KEY_A)["status"] == "succeeded"
        keyed_view = {
            (api_key, job_id): client.get(f"/v1/jobs/{job_id}", headers=key(api_key)).status_code
            for api_key in (KEY_A, KEY_B)
            for job_id in (anonymous_job, old_job)
        }
        keyed_lists = {api_key: listed_ids(client, headers=key(api_key)) for api_key in (KEY_A, KEY_B)}

    assert keyed_view == dict.fromkeys(keyed_view, 404)
    assert keyed_lists == {KEY_A: [keyed_job], KEY_B: []}

    # Without keys, the anonymous and the ownerless job are readable as before, and the key's job stays hidden.
    with student_server(without_keys) as client:
        statuses = {job_id: client.get(f"/v1/jobs/{job_id}").status_code for job_id in (anonymous_job, old_job, keyed_job)}
        old_result = client.get(f"/v1/jobs/{old_job}/result")
        unkeyed_list = listed_ids(client)
        first_page = client.get("/v1/jobs", params={"limit": 1}).json()
        keyed_delete = client.delete(f"/v1/jobs/{keyed_job}")

    assert statuses == {anonymous_job: 200, old_job: 200, keyed_job: 404}
    assert old_result.status_code == 200, old_result.text
    assert old_result.json()["id"] == old_job
    assert sorted(unkeyed_list) == sorted([anonymous_job, old_job])
    assert len(first_page["data"]) == 1
    assert first_page["has_more"] is True
    assert keyed_delete.status_code == 404
    assert (tmp_path / "jobs" / keyed_job / "job.json").is_file()
