"""The student server's web page in a real browser: a slide's progress, overlay and map, and a tile's summary.

The server runs on 127.0.0.1 with a small exported student, and Debian's Chromium, driven by Playwright,
uploads real files through the page's file input. Each result on the page is checked against the same
server's API. The browser tests skip when /usr/bin/chromium or the playwright package is absent; the
tests of the static routes need neither.
"""

from __future__ import annotations

import base64
import json
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from servers import run_app

from shared.api_keys import hash_key
from shared.checkpoint import load_student, save_student
from shared.models.student import UNITE_STUDENT_KWARGS, build_unite_student
from student_server.app import create_app
from student_server.page import CONTENT_SECURITY_POLICY
from student_server.settings import StudentSettings

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# One transformer block instead of twelve keeps the slide job short; the embedding stays 384-d.
SMALL_STUDENT_KWARGS = {**UNITE_STUDENT_KWARGS, "depth": 1}
LAB_KEY = "page-test-key-0123456789"
SLIDE_TIMEOUT_MS = 300_000
TILE_TIMEOUT_MS = 60_000

needs_browser = pytest.mark.skipif(
    sync_playwright is None or not CHROMIUM.is_file(),
    reason="the browser tests need Debian's Chromium at /usr/bin/chromium (apt-get install chromium) "
    "and the playwright package (pip install playwright)",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_student(
        build_unite_student(**SMALL_STUDENT_KWARGS),
        tmp_path_factory.mktemp("checkpoint") / "student",
        architecture="unite-vit-small-14",
        architecture_kwargs=SMALL_STUDENT_KWARGS,
        teacher="test-teacher/v1",
        teacher_licence="test",
        training={},
    )


@pytest.fixture(scope="module")
def base_url(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    settings = StudentSettings(checkpoint_dir=checkpoint, upload_dir=folder / "uploads", jobs_dir=folder / "jobs")
    with run_app(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_base_url(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("keyed-server")
    keys_file = folder / "keys.toml"
    keys_file.write_text(f"[[keys]]\nname = 'lab-a'\nsha256 = '{hash_key(LAB_KEY)}'\n", encoding="utf-8")
    settings = StudentSettings(
        checkpoint_dir=checkpoint, upload_dir=folder / "uploads", jobs_dir=folder / "jobs", keys_file=keys_file
    )
    with run_app(create_app(settings)) as url:
        yield url


@pytest.fixture()
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


@pytest.fixture()
def page(base_url, tmp_path):
    with open_page(base_url, tmp_path) as page:
        yield page


@contextmanager
def open_page(base_url: str, tmp_path: Path):
    """Open the page at ``base_url`` in a fresh Chromium profile; the page records console errors."""
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
        )
        try:
            page = context.new_page()
            console_errors: list[str] = []
            page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: console_errors.append(str(error)))
            page.goto(base_url)
            page.console_errors = console_errors
            yield page
        finally:
            context.close()


def lung_tile_png(shared_data: Path, folder: Path) -> Path:
    """Write a real 224 x 224 lung tile as PNG into ``folder`` and return its path."""
    source = sorted((shared_data / "tiles" / "lc25000_lung_dedup" / "lung_aca").glob("*.jpeg"))[0]
    path = folder / "lung-tile.png"
    Image.open(source).convert("RGB").save(path, format="PNG")
    return path


def wait_for_card(page, selector: str, finished_js: str, timeout_ms: int):
    """Wait until the first card matching ``selector`` has finished or shows an error, and return it."""
    page.wait_for_function(
        f"""() => {{
            const card = document.querySelector({json.dumps(selector)});
            return card !== null && ({finished_js} || !card.querySelector('.error').hidden);
        }}""",
        timeout=timeout_ms,
    )
    return page.locator(selector).first


def summary_value(card, term: str) -> str:
    """Return the text of the summary entry ``term`` of a result card."""
    return card.locator(f"dl.summary dt:text-is('{term}') + dd").inner_text()


# Static routes


def test_page_served_with_policy(client):
    response = client.get("/")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert 'id="file-input"' in response.text
    assert 'src="/static/app.js"' in response.text


@pytest.mark.parametrize(("name", "media_type"), [("app.js", "text/javascript"), ("style.css", "text/css")])
def test_page_static_files(client, name, media_type):
    response = client.get(f"/static/{name}")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    assert len(response.content) > 1000


@pytest.mark.parametrize("name", ["index.html", "settings.py", "page.py"])
def test_page_other_files_not_found(client, name):
    response = client.get(f"/static/{name}")

    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "not_found"
    assert "app.js, style.css" in error["message"]


def test_page_path_traversal_not_found(client):
    response = client.get("/static/..%2Fpage.py")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert "APIRouter" not in response.text


def test_page_loads_nothing_external():
    static = Path(__file__).resolve().parents[1] / "student_server" / "static"

    for path in static.iterdir():
        text = path.read_text(encoding="utf-8")
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), path.name
        assert "https://" not in text, path.name
        assert "//cdn" not in text, path.name


# In the browser


@needs_browser
def test_page_slide_progress_and_map(page, client, shared_data):
    page.set_input_files("#file-input", str(shared_data / "slides" / "CMU-1-Small-Region.svs"))

    card = wait_for_card(page, ".slide-card", "card.dataset.map === 'drawn'", SLIDE_TIMEOUT_MS)

    assert card.locator(".error").is_hidden(), card.locator(".error").inner_text()
    assert card.locator(".progress-text").inner_text().startswith("100 %")
    job = client.get(f"/v1/jobs/{card.get_attribute('data-job-id')}").json()
    assert job["status"] == "succeeded"
    assert job["num_patches"] > 0
    assert page.locator(".map-point").count() == job["num_patches"]
    assert summary_value(card, "Patches") == str(job["num_patches"])
    assert page.evaluate("() => document.querySelector('.slide-card .overlay').naturalWidth") > 0
    assert page.console_errors == []

    # The colour toggle: position colours are HSL, cluster colours come from the palette, one per cluster.
    clusters = client.get(f"/v1/jobs/{job['id']}/map").json()["clusters"]
    position_fills = set(page.eval_on_selector_all(".map-point", "points => points.map(p => p.getAttribute('fill'))"))
    card.get_by_role("radio", name="cluster").check()
    cluster_fills = set(page.eval_on_selector_all(".map-point", "points => points.map(p => p.getAttribute('fill'))"))

    assert card.get_attribute("data-colour") == "cluster"
    assert all(fill.startswith("hsl(") for fill in position_fills)
    assert all(fill.startswith("#") for fill in cluster_fills)
    assert 1 <= len(cluster_fills) <= clusters


@needs_browser
def test_page_tile_summary(page, client, checkpoint, shared_data, tmp_path):
    tile = lung_tile_png(shared_data, tmp_path)
    expected = client.post(
        "/v1/embeddings", json={"input": [{"image": base64.b64encode(tile.read_bytes()).decode("ascii")}]}
    ).json()
    expected_norm = float(np.linalg.norm(np.asarray(expected["data"][0]["embedding"], dtype=np.float64)))

    page.set_input_files("#file-input", str(tile))
    card = wait_for_card(page, ".tile-card", "card.dataset.status === 'done'", TILE_TIMEOUT_MS)

    assert card.locator(".error").is_hidden(), card.locator(".error").inner_text()
    assert summary_value(card, "Dimension") == "384"
    assert summary_value(card, "Model") == expected["model"]
    sha256 = load_student(checkpoint).sha256
    assert summary_value(card, "Checkpoint sha256") == sha256[:12]
    assert card.locator("dl.summary dt:text-is('Checkpoint sha256') + dd").get_attribute("title") == sha256
    assert float(summary_value(card, "L2 norm")) == pytest.approx(expected_norm, abs=1e-3)
    assert card.locator(".sparkline polyline").get_attribute("points").count(",") == 384
    assert page.console_errors == []


@needs_browser
def test_page_shows_api_error_message(page, client, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG file")
    with broken.open("rb") as file:
        response = client.post("/v1/embeddings/upload", files={"file": ("broken.png", file, "image/png")})
    assert response.status_code == 422
    message = response.json()["error"]["message"]

    page.set_input_files("#file-input", str(broken))
    card = wait_for_card(page, ".tile-card", "false", TILE_TIMEOUT_MS)

    assert card.get_attribute("data-status") == "failed"
    assert card.locator(".error").inner_text() == message


@needs_browser
def test_page_sends_stored_api_key(page, base_url):
    page.get_by_text("Options").click()
    page.get_by_label("API key").fill("test-key-123")
    with page.expect_request(lambda request: request.url == f"{base_url}/v1/models") as request_info:
        page.reload()

    assert page.evaluate("() => sessionStorage.getItem('unite-student-api-key')") == "test-key-123"
    assert request_info.value.headers.get("x-api-key") == "test-key-123"
    assert page.get_by_label("API key").input_value() == "test-key-123"


@needs_browser
def test_page_with_api_key(keyed_base_url, shared_data, tmp_path):
    tile = lung_tile_png(shared_data, tmp_path)
    with httpx.Client(base_url=keyed_base_url, timeout=60) as keyed_client:
        unauthorized = keyed_client.get("/v1/models")
        assert unauthorized.status_code == 401
        message = unauthorized.json()["error"]["message"]
        with tile.open("rb") as file:
            upload = keyed_client.post("/v1/embeddings/upload", files={"file": ("tile.png", file, "image/png")})
        assert upload.status_code == 401
        upload_message = upload.json()["error"]["message"]

        with open_page(keyed_base_url, tmp_path) as page:
            page.wait_for_function("() => document.getElementById('server-status').textContent.startsWith('Unauthorized')")
            assert page.locator("#server-status").inner_text() == f"Unauthorized: {message} Enter the key in the API key field."
            page.set_input_files("#file-input", str(tile))
            card = wait_for_card(page, ".tile-card", "false", TILE_TIMEOUT_MS)
            assert card.locator(".error").inner_text() == upload_message

            page.get_by_text("Options").click()
            page.get_by_label("API key").fill(LAB_KEY)
            page.set_input_files("#file-input", str(shared_data / "slides" / "CMU-1-Small-Region.svs"))
            card = wait_for_card(page, ".slide-card", "card.dataset.map === 'drawn'", SLIDE_TIMEOUT_MS)

            assert card.locator(".error").is_hidden(), card.locator(".error").inner_text()
            job = keyed_client.get(f"/v1/jobs/{card.get_attribute('data-job-id')}", headers={"X-API-Key": LAB_KEY}).json()
            assert page.locator(".map-point").count() == job["num_patches"]
            assert page.evaluate("() => document.querySelector('.slide-card .overlay').naturalWidth") > 0


@needs_browser
def test_page_tiles_get_own_results(page, client, shared_data, tmp_path):
    good = lung_tile_png(shared_data, tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG file")
    with broken.open("rb") as file:
        message = client.post("/v1/embeddings/upload", files={"file": ("broken.png", file, "image/png")}).json()["error"]["message"]

    page.set_input_files("#file-input", [str(good), str(broken)])
    page.wait_for_function(
        """() => {
            const cards = document.querySelectorAll('.tile-card');
            return cards.length === 2 && [...cards].every((card) => ['done', 'failed'].includes(card.dataset.status));
        }""",
        timeout=TILE_TIMEOUT_MS,
    )
    good_card = page.locator(".tile-card", has_text="lung-tile.png")
    broken_card = page.locator(".tile-card", has_text="broken.png")

    assert good_card.get_attribute("data-status") == "done"
    assert good_card.locator(".error").is_hidden()
    assert summary_value(good_card, "Dimension") == "384"
    assert broken_card.get_attribute("data-status") == "failed"
    assert broken_card.locator(".error").inner_text() == message
