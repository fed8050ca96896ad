"""Opening the real slides: their metadata, resolution, regions, thumbnails, associated images and errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import tiffslide
from PIL import Image
from slide_data import BRACS, CMU1, NDPI, TCGA
from synthetic_slides import he_like, write_tiff_slide

from shared.errors import ConfigError, SlideError
from shared.slides import magnification_for_mpp, open_slide
from shared.slides.reader import compute_slide_id


def test_cmu1_info_from_metadata(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU1) as slide:
        info = slide.info

    assert info.mpp == pytest.approx(0.499, abs=1e-6)
    assert info.mpp_source == "metadata"
    assert info.level0_magnification == 20
    assert (info.level0_width, info.level0_height) == (2220, 2967)
    assert info.level_count == 1
    assert info.level_downsamples == (1.0,)
    assert info.vendor == "aperio"
    assert info.name == "CMU-1-Small-Region"
    assert info.path == slides_dir / CMU1
    assert info.reader == "openslide"
    assert info.associated_names == ("label", "macro", "thumbnail")


def test_slide_id_ignores_file_name(slides_dir: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "patient-1234.svs"
    renamed.symlink_to(slides_dir / CMU1)

    with open_slide(slides_dir / CMU1) as original, open_slide(renamed) as linked:
        original_id, linked_id = original.info.slide_id, linked.info.slide_id

    assert len(original_id) == 16
    assert int(original_id, 16) >= 0
    assert linked_id == original_id
    assert "CMU" not in original_id
    assert compute_slide_id(slides_dir / TCGA) != original_id


def test_override_wins_over_metadata(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU1, mpp=0.25) as slide:
        info = slide.info

    assert info.mpp == 0.25
    assert info.mpp_source == "override"
    assert info.level0_magnification == 40


def test_glass_and_outside_read_white(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU1) as slide:
        glass = slide.read_region_level0(0, 0, 224, 224)
        outside = slide.read_region_level0(slide.info.level0_width + 100, 0, 224, 112)

    assert glass.shape == (224, 224, 3)
    assert glass.mean() > 220
    assert outside.shape == (112, 112, 3)
    assert (outside == 255).all()


def test_thumbnail_keeps_aspect_ratio(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU1) as slide:
        thumbnail = slide.thumbnail(512)

    assert thumbnail.shape == (512, round(2220 * 512 / 2967), 3)
    assert thumbnail.dtype == np.uint8


def test_ndpi_40x_reads_from_level_1(slides_dir: Path) -> None:
    with open_slide(slides_dir / NDPI) as slide:
        info = slide.info
        size_level0 = round(224 * 0.5 / info.mpp)
        x, y = info.level0_width // 2, info.level0_height // 2
        level = slide.best_level_for_downsample(size_level0 / 224)
        tile = slide.read_region_level0(x, y, size_level0, 224)

    with openslide.OpenSlide(str(slides_dir / NDPI)) as handle:
        from_level_1 = handle.read_region((x, y), 1, (246, 246)).convert("RGB")
        from_level_0 = handle.read_region((x, y), 0, (491, 491)).convert("RGB")
    expected = np.asarray(from_level_1.resize((224, 224), Image.Resampling.LANCZOS))
    from_full_resolution = np.asarray(from_level_0.resize((224, 224), Image.Resampling.LANCZOS))

    assert info.mpp == pytest.approx(0.22818, abs=1e-4)
    assert info.mpp_source == "tiff-resolution"
    assert info.level0_magnification == 40
    assert info.level_count == 7
    assert info.reader == "openslide"
    assert info.vendor == "hamamatsu"
    assert info.associated_names == ("macro",)
    assert size_level0 == 491
    assert level == 1
    assert tile.shape == (224, 224, 3)
    assert (tile == expected).all()
    assert not (tile == from_full_resolution).all()


def test_tcga_without_resolution_names_override(slides_dir: Path) -> None:
    with pytest.raises(SlideError) as raised:
        open_slide(slides_dir / TCGA)

    message = str(raised.value)
    assert raised.value.reason == "no_resolution"
    assert TCGA in message
    assert "no resolution" in message
    assert "mpp=" in message
    assert "--mpp " in message
    assert "--mpp-csv" in message


def test_bracs_absurd_resolution_rejected(slides_dir: Path) -> None:
    with pytest.raises(SlideError) as raised:
        open_slide(slides_dir / BRACS)

    message = str(raised.value)
    assert raised.value.reason == "implausible_resolution"
    assert BRACS in message
    assert "1000 µm/px in tiff.XResolution" in message
    assert "mpp=" in message
    assert "--mpp-csv" in message
    assert raised.value.value == 1000


def test_missing_slide_raises(tmp_path: Path) -> None:
    missing = tmp_path / "absent.svs"

    with pytest.raises(SlideError) as raised:
        open_slide(missing)

    assert str(raised.value).startswith(f"slide not found: {missing}")
    assert raised.value.reason == "not_found"


@pytest.mark.parametrize(
    ("file_name", "content"),
    [
        ("random.svs", np.random.default_rng(0).bytes(4096)),
        ("notes.tif", b"this is a text file, not a slide\n"),
    ],
    ids=["random-bytes", "text-file"],
)
def test_non_slide_file_lists_readers(tmp_path: Path, file_name: str, content: bytes) -> None:
    path = tmp_path / file_name
    path.write_bytes(content)

    with pytest.raises(SlideError) as raised:
        open_slide(path)

    message = str(raised.value)
    assert raised.value.reason == "unreadable"
    assert message.startswith(f"slide {path} is not in a format any reader recognises")
    assert f"openslide {openslide.__library_version__} rejected it (Unsupported or missing image file)" in message
    assert f"tiffslide {tiffslide.__version__} rejected it (not a TIFF file" in message
    assert "Pillow" in message
    assert "cannot identify image file" in message
    assert "Aperio (.svs" in message
    assert "Convert the file to a pyramidal TIFF" in message


def test_directory_is_not_a_slide(tmp_path: Path) -> None:
    with pytest.raises(SlideError) as raised:
        open_slide(tmp_path)

    assert raised.value.reason == "not_found"
    assert str(raised.value) == f"slide {tmp_path} is a folder, not a file. Pass the path of the slide file itself."


def test_symlink_loop_named(tmp_path: Path) -> None:
    (tmp_path / "a.svs").symlink_to("b.svs")
    (tmp_path / "b.svs").symlink_to("a.svs")

    with pytest.raises(SlideError) as raised:
        open_slide(tmp_path / "a.svs")

    assert raised.value.reason == "not_found"
    assert str(raised.value).startswith(f"slide {tmp_path / 'a.svs'} is a loop of symbolic links")


def test_dangling_symlink_named(tmp_path: Path) -> None:
    link = tmp_path / "moved.svs"
    link.symlink_to(tmp_path / "archive" / "moved.svs")

    with pytest.raises(SlideError) as raised:
        open_slide(link)

    assert raised.value.reason == "not_found"
    assert str(raised.value).startswith(
        f"slide {link} is a symbolic link to {tmp_path / 'archive' / 'moved.svs'}, which does not exist"
    )


def test_fifo_named_and_not_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)

    # Opening a FIFO without a writer would block, so a pass here also shows it was not opened.
    with pytest.raises(SlideError) as raised:
        open_slide(fifo)

    assert raised.value.reason == "not_found"
    assert str(raised.value) == (
        f"slide {fifo} is a named pipe (FIFO), not a regular file. Pass the path of the slide file itself."
    )


OPEN_IN_SUBPROCESS = """
import json, sys
from shared.errors import SlideError
from shared.slides import open_slide
try:
    open_slide(sys.argv[1], mpp=0.5)
except SlideError as error:
    print(json.dumps({"reason": error.reason, "message": str(error)}))
"""


def test_permission_denied_has_own_message(tmp_path: Path) -> None:
    path = write_tiff_slide(tmp_path / "locked.tif", he_like(300, 400))
    path.chmod(0)
    command = [sys.executable, "-c", OPEN_IN_SUBPROCESS, str(path)]
    if os.geteuid() == 0:
        # root reads any file, so the check runs without the capabilities that let it.
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv, which is needed to drop the permission override")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    repository = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONPATH": str(repository)}

    completed = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=repository, check=False)

    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["reason"] == "permission_denied"
    assert result["message"].startswith(f"slide {path} cannot be read: permission denied.")
    assert "read permission on the file" in result["message"]
    assert "damaged" not in result["message"]
    assert "copy it again" not in result["message"]


@pytest.mark.parametrize("mpp", [0.0, -0.5, 1000.0, float("nan")])
def test_implausible_override_raises(slides_dir: Path, mpp: float) -> None:
    with pytest.raises(ConfigError, match="mpp override"):
        open_slide(slides_dir / CMU1, mpp=mpp)


def test_closed_slide_raises(slides_dir: Path) -> None:
    slide = open_slide(slides_dir / CMU1)
    slide.close()

    with pytest.raises(SlideError, match="is closed"):
        slide.read_region_level0(0, 0, 224, 224)


@pytest.mark.parametrize(
    ("mpp", "magnification"),
    [(0.12, 80), (0.17, 60), (0.228, 40), (0.25, 40), (0.499, 20), (0.5, 20), (1.0, 10), (2.0, 5), (4.0, 2)],
)
def test_magnification_buckets(mpp: float, magnification: int) -> None:
    assert magnification_for_mpp(mpp) == magnification


def test_associated_images_not_read_on_open(slides_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    read_associated_image = openslide.lowlevel.read_associated_image

    def counting_read(osr, name: str):
        reads.append(name)
        return read_associated_image(osr, name)

    monkeypatch.setattr(openslide.lowlevel, "read_associated_image", counting_read)

    with open_slide(slides_dir / CMU1) as slide:
        names = slide.info.associated_names
        slide.read_region_level0(0, 0, 224, 224)
        slide.thumbnail(256)

    assert names == ("label", "macro", "thumbnail")
    assert reads == []


def test_read_associated_on_request(slides_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with open_slide(slides_dir / CMU1) as slide, caplog.at_level(logging.INFO, logger="shared.slides.reader"):
        macro = slide.read_associated("macro")
        slide_id = slide.info.slide_id

    with openslide.OpenSlide(str(slides_dir / CMU1)) as handle:
        expected = np.asarray(handle.associated_images["macro"].convert("RGB"))

    assert macro.shape == (431, 1280, 3)
    assert macro.dtype == np.uint8
    assert (macro == expected).all()
    assert f"slide {slide_id}: read the associated image 'macro' on request" in caplog.messages


def test_read_associated_unknown_name(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU1) as slide, pytest.raises(ConfigError) as raised:
        slide.read_associated("overview")

    message = str(raised.value)
    assert f"slide {slides_dir / CMU1} has no associated image 'overview'" in message
    assert "['label', 'macro', 'thumbnail']" in message
