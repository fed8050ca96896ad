"""The student server's web page in a real browser: a slide's progress, overlay and map, and a tile's summary.

The server runs on 127.0.0.1 with a small exported student, and Debian's Chromium, driven by Playwright,
uploads real files through the page's file input. Each result on the page is checked against the same
server's API. The map is a canvas, so its tests read its pixels. The browser tests skip when
/usr/bin/chromium or the playwright package is absent; the tests of the static routes need neither.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from servers import run_app

from shared.api_keys import hash_key
from shared.checkpoint import load_student, save_student
from shared.errors import ConfigError
from shared.models.student import UNITE_STUDENT_KWARGS, build_unite_student
from shared.settings import load_settings
from student_server.app import create_app
from student_server.jobs import OUTPUTS_DIR, RECORD_FILE, SUCCEEDED, JobRecord, utc_now
from student_server.page import CONTENT_SECURITY_POLICY
from student_server.settings import ENV_PREFIX, StudentSettings
from student_server.slide_pipeline import OUTPUT_FILES, embedding_map

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
DEFAULT_TIFF_SLIDE_MIN_BYTES = 8 * 1024 * 1024
# Below the size of the 224 x 224 uncompressed RGB TIFF tile (about 150 kB) that the tests upload.
SMALL_TIFF_SLIDE_MIN_BYTES = 100_000
LARGE_MAP_POINTS = 50_000
# A pixel whose RGB channels spread by more than this is a coloured dot, never the grey axis labels.
COLOURED_SPREAD = 60
TOOLTIP_TEXT = re.compile(r"patch at level-0 \((?P<px>[-\d.]+), (?P<py>[-\d.]+)\), cluster (?P<cluster>\d+)")

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


@pytest.fixture(scope="module")
def small_tiff_base_url(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("small-tiff-server")
    settings = StudentSettings(
        checkpoint_dir=checkpoint,
        upload_dir=folder / "uploads",
        jobs_dir=folder / "jobs",
        page_tiff_slide_min_bytes=SMALL_TIFF_SLIDE_MIN_BYTES,
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
def open_page(base_url: str, tmp_path: Path, *, path: str = "/", **context_options):
    """Open ``path`` of ``base_url`` in a fresh Chromium profile; the page records console errors.

    ``context_options`` go to Playwright's ``launch_persistent_context``, for instance ``device_scale_factor``.
    """
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            **context_options,
        )
        try:
            page = context.new_page()
            console_errors: list[str] = []
            page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: console_errors.append(str(error)))
            page.goto(base_url + path)
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


def lung_tile_tiff(shared_data: Path, folder: Path) -> Path:
    """Write a real 224 x 224 lung tile as an uncompressed TIFF (about 150 kB) into ``folder`` and return its path."""
    source = sorted((shared_data / "tiles" / "lc25000_lung_dedup" / "lung_aca").glob("*.jpeg"))[0]
    path = folder / "lung-tile.tif"
    Image.open(source).convert("RGB").save(path, format="TIFF")
    return path


def map_pixels(card, palette: list[str]) -> dict:
    """Summarise the pixels of the card's map canvas, read with getImageData.

    Returns the canvas' size in device pixels and CSS pixels and ``coloured``, the number of pixels of
    dots (see COLOURED_SPREAD). ``palette_counts`` counts the pixels of each exact ``palette`` colour.
    ``palette_spots`` gives, per palette colour, the page position of one pixel whose eight neighbours
    have the same colour, so that it lies well inside a dot.
    """
    return card.locator("canvas.map").evaluate(
        """(canvas, [palette, spread]) => {
            const { width, height } = canvas;
            const data = canvas.getContext('2d').getImageData(0, 0, width, height).data;
            const hexAt = (x, y) => {
                const i = 4 * (y * width + x);
                if (data[i + 3] !== 255) {
                    return null;
                }
                return '#' + [data[i], data[i + 1], data[i + 2]].map((v) => v.toString(16).padStart(2, '0').toUpperCase()).join('');
            };
            const wanted = new Set(palette.map((colour) => colour.toUpperCase()));
            const bounds = canvas.getBoundingClientRect();
            let coloured = 0;
            const paletteCounts = {};
            const paletteSpots = {};
            for (let y = 0; y < height; y += 1) {
                for (let x = 0; x < width; x += 1) {
                    const i = 4 * (y * width + x);
                    const channels = [data[i], data[i + 1], data[i + 2]];
                    if (data[i + 3] > 0 && Math.max(...channels) - Math.min(...channels) > spread) {
                        coloured += 1;
                    }
                    const hex = hexAt(x, y);
                    if (hex === null || !wanted.has(hex)) {
                        continue;
                    }
                    paletteCounts[hex] = (paletteCounts[hex] || 0) + 1;
                    if (hex in paletteSpots || x === 0 || y === 0 || x === width - 1 || y === height - 1) {
                        continue;
                    }
                    let inside = true;
                    for (let dy = -1; dy <= 1 && inside; dy += 1) {
                        for (let dx = -1; dx <= 1 && inside; dx += 1) {
                            inside = hexAt(x + dx, y + dy) === hex;
                        }
                    }
                    if (inside) {
                        paletteSpots[hex] = {
                            x: bounds.left + canvas.clientLeft + ((x + 0.5) * canvas.clientWidth) / width,
                            y: bounds.top + canvas.clientTop + ((y + 0.5) * canvas.clientHeight) / height,
                        };
                    }
                }
            }
            return {
                width, height, cssWidth: canvas.clientWidth, cssHeight: canvas.clientHeight,
                coloured, palette_counts: paletteCounts, palette_spots: paletteSpots,
            };
        }""",
        [palette, COLOURED_SPREAD],
    )


def write_succeeded_job(jobs_dir: Path, count: int) -> str:
    """Write a succeeded job of ``count`` patches into ``jobs_dir``, as a finished slide job leaves it, and return its id.

    The patch features are synthetic (eight Gaussian clusters of 16-d vectors on a square grid of patches),
    and map.json is laid out from them by the pipeline's own :func:`embedding_map`. The server loads the
    job when it starts on ``jobs_dir``.
    """
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(8, 16))
    features = (centres[rng.integers(0, len(centres), size=count)] + rng.normal(size=(count, 16))).astype(np.float32)
    patch_size = 224
    columns = int(np.ceil(np.sqrt(count)))
    indices = np.arange(count)
    coords = np.stack([indices % columns, indices // columns], axis=1).astype(np.int64) * patch_size

    job_id = uuid.uuid4().hex
    outputs = jobs_dir / job_id / OUTPUTS_DIR
    outputs.mkdir(parents=True)
    (outputs / OUTPUT_FILES["map"]).write_text(json.dumps(embedding_map(features, coords, patch_size)), encoding="utf-8")
    Image.new("RGB", (columns, columns), (236, 214, 226)).save(outputs / OUTPUT_FILES["overlay"], format="JPEG")
    slide_embedding = features.mean(axis=0)
    result = {
        "slide_id": "synthetic-large-map",
        "num_patches": count,
        "embedding_dim": features.shape[1],
        "pooling": "mean",
        "slide_embedding": [float(value) for value in slide_embedding],
        "model": "synthetic-features",
        "checkpoint_sha256": "0" * 64,
        "encoder": f"synthetic-features sha256:{'0' * 64}",
        "metadata": {"pooling": "mean", "pooled_dim": features.shape[1], "patch_size_level0": patch_size},
        "timings": {},
    }
    (outputs / OUTPUT_FILES["result"]).write_text(json.dumps(result), encoding="utf-8")

    now = utc_now()
    record = JobRecord(
        id=job_id,
        status=SUCCEEDED,
        source="upload",
        slide=f"upload-{job_id}.svs",
        slide_label="uploaded slide",
        options={"pooling": "mean"},
        created=now,
        started=now,
        finished=now,
        attempts=1,
        slide_id=result["slide_id"],
        num_patches=count,
        progress_done=count,
        progress_total=count,
    )
    (jobs_dir / job_id / RECORD_FILE).write_text(json.dumps(asdict(record)), encoding="utf-8")
    return job_id


# Static routes


def test_page_served_with_policy(client):
    response = client.get("/")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert 'id="file-input"' in response.text
    assert 'src="/static/map.js"' in response.text
    assert 'src="/static/app.js"' in response.text
    assert "<script>" not in response.text


def test_page_carries_tiff_setting(client, small_tiff_base_url):
    default_page = client.get("/").text
    small_page = httpx.get(small_tiff_base_url + "/", timeout=60).text

    assert f'data-tiff-slide-min-bytes="{DEFAULT_TIFF_SLIDE_MIN_BYTES}"' in default_page
    assert "TIFF files smaller than 8 MiB" in default_page
    assert f'data-tiff-slide-min-bytes="{SMALL_TIFF_SLIDE_MIN_BYTES}"' in small_page
    assert f"TIFF files smaller than {SMALL_TIFF_SLIDE_MIN_BYTES} bytes" in small_page
    assert "{{" not in default_page
    assert "{{" not in small_page


@pytest.mark.parametrize("value", [0, -1])
def test_tiff_setting_rejects_non_positive(value):
    with pytest.raises(ValidationError) as caught:
        StudentSettings(page_tiff_slide_min_bytes=value)

    message = str(caught.value)
    assert f"page_tiff_slide_min_bytes is {value}, expected a positive number of bytes" in message
    assert "Set UNITE_STUDENT_PAGE_TIFF_SLIDE_MIN_BYTES to 1 or more" in message


def test_tiff_setting_error_names_variable(monkeypatch):
    monkeypatch.setenv("UNITE_STUDENT_PAGE_TIFF_SLIDE_MIN_BYTES", "0")

    with pytest.raises(ConfigError) as caught:
        load_settings(StudentSettings, env_prefix=ENV_PREFIX, service="student server")

    assert "UNITE_STUDENT_PAGE_TIFF_SLIDE_MIN_BYTES: Value error, page_tiff_slide_min_bytes is 0" in caught.value.message


@pytest.mark.parametrize("value", [str(2**53), "99999999999999999999999"])
def test_tiff_setting_rejects_unsafe_integer(monkeypatch, value):
    monkeypatch.setenv("UNITE_STUDENT_PAGE_TIFF_SLIDE_MIN_BYTES", value)

    with pytest.raises(ConfigError) as caught:
        load_settings(StudentSettings, env_prefix=ENV_PREFIX, service="student server")

    message = caught.value.message
    assert f"UNITE_STUDENT_PAGE_TIFF_SLIDE_MIN_BYTES: Value error, page_tiff_slide_min_bytes is {value}" in message
    assert "expected at most 9007199254740991 bytes (2**53 - 1)" in message
    assert "Set UNITE_STUDENT_PAGE_TIFF_SLIDE_MIN_BYTES to 9007199254740991 or less" in message


@needs_browser
def test_page_accepts_largest_tiff_setting(checkpoint, tmp_path):
    largest = 2**53 - 1
    settings = StudentSettings(
        checkpoint_dir=checkpoint, upload_dir=tmp_path / "uploads", jobs_dir=tmp_path / "jobs", page_tiff_slide_min_bytes=largest
    )

    with run_app(create_app(settings)) as url, open_page(url, tmp_path) as page:
        page.wait_for_load_state("load")

        assert page.locator("body").get_attribute("data-tiff-slide-min-bytes") == str(largest)
        assert page.locator("#page-error").count() == 1
        assert page.locator("#page-error").is_hidden(), page.locator("#page-error").inner_text()
        assert page.console_errors == []


def test_tiff_setting_read_from_environment(monkeypatch):
    monkeypatch.setenv("UNITE_STUDENT_PAGE_TIFF_SLIDE_MIN_BYTES", "123456")

    settings = load_settings(StudentSettings, env_prefix=ENV_PREFIX, service="student server")

    assert settings.page_tiff_slide_min_bytes == 123456
    assert StudentSettings.model_fields["page_tiff_slide_min_bytes"].default == DEFAULT_TIFF_SLIDE_MIN_BYTES


@pytest.mark.parametrize(
    ("name", "media_type"), [("app.js", "text/javascript"), ("map.js", "text/javascript"), ("style.css", "text/css")]
)
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
    assert "app.js, map.js, style.css" in error["message"]


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
    assert card.locator("canvas.map").get_attribute("data-points") == str(job["num_patches"])
    assert summary_value(card, "Patches") == str(job["num_patches"])
    assert page.evaluate("() => document.querySelector('.slide-card .overlay').naturalWidth") > 0
    assert page.console_errors == []

    # Position colours are HSL at 70 % saturation, so no dot is drawn in an exact palette colour.
    palette = page.evaluate("() => CLUSTER_COLOURS")
    position_pixels = map_pixels(card, palette)
    assert position_pixels["width"] == position_pixels["cssWidth"] > 0
    # Each dot covers about 75 pixels, and the axis labels alone give a few coloured pixels of anti-aliasing.
    assert position_pixels["coloured"] > 10 * job["num_patches"]
    assert position_pixels["palette_counts"] == {}

    # Cluster colours come from the palette, at most one per cluster.
    points = client.get(f"/v1/jobs/{job['id']}/map").json()
    card.get_by_role("radio", name="cluster").check()
    # In view, so the mouse can reach the dots at the positions map_pixels returns.
    card.locator("canvas.map").scroll_into_view_if_needed()
    cluster_pixels = map_pixels(card, palette)
    assert card.get_attribute("data-colour") == "cluster"
    assert card.locator("canvas.map").get_attribute("data-points") == str(job["num_patches"])
    assert 1 <= len(cluster_pixels["palette_counts"]) <= points["clusters"]
    assert set(cluster_pixels["palette_counts"]) <= {colour.upper() for colour in palette[: points["clusters"]]}

    # Hovering a dot names its patch, and the dot has its cluster's colour.
    patches = {(point["px"], point["py"], point["cluster"]) for point in points["points"]}
    tooltip = card.locator(".map-tooltip")
    assert cluster_pixels["palette_spots"]
    for colour, spot in cluster_pixels["palette_spots"].items():
        page.mouse.move(spot["x"], spot["y"])
        assert tooltip.is_visible()
        match = TOOLTIP_TEXT.fullmatch(tooltip.inner_text())
        assert match, tooltip.inner_text()
        assert (float(match["px"]), float(match["py"]), int(match["cluster"])) in patches
        assert palette[int(match["cluster"])].upper() == colour
    page.mouse.move(1, 1)
    assert tooltip.is_hidden()


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
            assert card.locator("canvas.map").get_attribute("data-points") == str(job["num_patches"])
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


@needs_browser
def test_page_large_map_draws_every_point(checkpoint, tmp_path):
    jobs_dir = tmp_path / "jobs"
    job_id = write_succeeded_job(jobs_dir, LARGE_MAP_POINTS)
    settings = StudentSettings(checkpoint_dir=checkpoint, upload_dir=tmp_path / "uploads", jobs_dir=jobs_dir)

    with run_app(create_app(settings)) as url, open_page(url, tmp_path, path=f"/?job={job_id}", device_scale_factor=2) as page:
        card = wait_for_card(page, ".slide-card", "card.dataset.map === 'drawn'", TILE_TIMEOUT_MS)
        canvas = card.locator("canvas.map")

        assert card.locator(".error").is_hidden(), card.locator(".error").inner_text()
        assert card.get_attribute("data-job-id") == job_id
        assert summary_value(card, "Patches") == str(LARGE_MAP_POINTS)
        assert canvas.get_attribute("data-points") == str(LARGE_MAP_POINTS)
        pixels = map_pixels(card, [])
        # The backing store has two device pixels per CSS pixel.
        assert pixels["width"] == 2 * pixels["cssWidth"]
        assert pixels["height"] == 2 * pixels["cssHeight"]
        assert pixels["coloured"] > 10_000

        # A narrower window shrinks the canvas, and the map is drawn again at the new size.
        page.set_viewport_size({"width": 360, "height": 800})
        page.wait_for_function(
            """(previousWidth) => {
                const canvas = document.querySelector('.slide-card canvas.map');
                return canvas.width === 2 * canvas.clientWidth && canvas.width < previousWidth;
            }""",
            arg=pixels["width"],
            timeout=TILE_TIMEOUT_MS,
        )
        resized = map_pixels(card, [])
        assert resized["width"] < pixels["width"]
        assert canvas.get_attribute("data-points") == str(LARGE_MAP_POINTS)
        assert resized["coloured"] > 5_000
        assert page.console_errors == []


@needs_browser
def test_page_unknown_job_fails_at_once(base_url, tmp_path):
    job_id = uuid.uuid4().hex
    message = httpx.get(f"{base_url}/v1/jobs/{job_id}", timeout=60).json()["error"]["message"]

    with open_page(base_url, tmp_path, path=f"/?job={job_id}") as page:
        card = wait_for_card(page, ".slide-card", "false", TILE_TIMEOUT_MS)

        assert card.get_attribute("data-status") == "failed"
        assert card.locator(".error").inner_text() == message


@needs_browser
def test_page_small_tiff_sent_as_tile(page, base_url, shared_data, tmp_path):
    tiff = lung_tile_tiff(shared_data, tmp_path)
    assert tiff.stat().st_size < DEFAULT_TIFF_SLIDE_MIN_BYTES

    with page.expect_request(lambda request: request.method == "POST" and request.url.startswith(base_url + "/v1/")) as request_info:
        page.set_input_files("#file-input", str(tiff))
    card = wait_for_card(page, ".tile-card", "card.dataset.status === 'done'", TILE_TIMEOUT_MS)

    assert request_info.value.url == f"{base_url}/v1/embeddings/upload"
    assert card.locator(".error").is_hidden(), card.locator(".error").inner_text()
    assert summary_value(card, "Dimension") == "384"


@needs_browser
def test_page_tiff_over_setting_sent_as_slide(small_tiff_base_url, shared_data, tmp_path):
    tiff = lung_tile_tiff(shared_data, tmp_path)
    assert tiff.stat().st_size >= SMALL_TIFF_SLIDE_MIN_BYTES

    with open_page(small_tiff_base_url, tmp_path) as page:
        with page.expect_request(
            lambda request: request.method == "POST" and request.url.startswith(small_tiff_base_url + "/v1/")
        ) as request_info:
            page.set_input_files("#file-input", str(tiff))
        # Waits for the job to end, so the server does not stop while it runs.
        card = wait_for_card(page, ".slide-card", "['succeeded', 'failed'].includes(card.dataset.status)", SLIDE_TIMEOUT_MS)

        assert request_info.value.url == f"{small_tiff_base_url}/v1/slides"
        assert card.get_attribute("data-job-id")
        assert page.locator(".tile-card").count() == 0


@needs_browser
def test_page_invalid_job_ids_rejected(base_url, tmp_path):
    # "." and ".." are the ids that the browser rewrites into other paths: /v1/jobs/. becomes the job list.
    job_ids = [".", "..", uuid.uuid4().hex.upper(), uuid.uuid4().hex[:31], "../healthz"]
    query = "&".join(f"job={quote(job_id, safe='')}" for job_id in job_ids)

    with open_page(base_url, tmp_path, path=f"/?{query}") as page:
        page.wait_for_function(
            "count => [...document.querySelectorAll('.slide-card')].filter(card => !card.querySelector('.error').hidden).length === count",
            arg=len(job_ids),
            timeout=TILE_TIMEOUT_MS,
        )
        cards = page.locator(".slide-card")

        assert cards.count() == len(job_ids)
        for index, job_id in enumerate(job_ids):
            card = cards.nth(index)
            error = card.locator(".error").inner_text()
            assert card.get_attribute("data-status") == "failed", job_id
            assert card.get_attribute("data-job-id") is None, job_id
            assert f'the job id "{job_id}" in the page\'s address is invalid' in error
            assert "expected 32 lowercase hex digits" in error
        assert page.console_errors == []


@needs_browser
def test_page_job_response_without_status_fails(base_url, tmp_path):
    job_id = uuid.uuid4().hex
    job_path = f"/v1/jobs/{job_id}"

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = context.new_page()
            # The request for the job goes to the real server's job list, which has no "status".
            page.route(base_url + job_path, lambda route: route.continue_(url=base_url + "/v1/jobs"))
            page.goto(f"{base_url}/?job={job_id}")
            card = wait_for_card(page, ".slide-card", "false", TILE_TIMEOUT_MS)

            assert card.get_attribute("data-status") == "failed"
            assert card.locator(".error").inner_text() == (
                f"GET {job_path} returned no job: its status is none, expected one of queued, running, succeeded, failed, "
                "interrupted. Check that the page is served by the student server and that the job id is right."
            )
        finally:
            context.close()
