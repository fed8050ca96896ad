"""Pooling of TRIDENT-layout feature files, on colour-histogram features of real lung tiles."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from shared.errors import ConfigError
from shared.features import read_features, write_features
from shared.pooling import pool_case_files, pool_patch_features, pool_slide_file, read_case_map
from tests.lung_features import load_lung_tiles

ENCODER = "colour-histogram-48"


@pytest.fixture(scope="module")
def histograms(shared_data):
    return load_lung_tiles(shared_data / "tiles" / "lc25000_lung_dedup").features.astype(np.float32)


def _slide_attrs(name: str, width: int) -> dict:
    return {
        "patch_size": 224,
        "patch_size_level0": 448,
        "level0_magnification": 40,
        "target_magnification": 20,
        "overlap": 0,
        "name": name,
        "level0_width": width,
        "level0_height": 4096,
        "mpp": 0.25,
        "encoder": ENCODER,
    }


@pytest.fixture()
def slide_files(histograms, tmp_path):
    """Two slides of one case: A with 7 tiles, B with 3, whose means differ, so early and late fusion differ."""
    folder = tmp_path / "features"
    features = {"slide_a": histograms[:7], "slide_b": histograms[200:203]}
    paths = {}
    for number, (slide_id, rows) in enumerate(features.items()):
        coords = np.stack([np.arange(len(rows)) * 448, np.full(len(rows), number * 448)], axis=1).astype(np.int64)
        paths[slide_id] = write_features(folder / f"{slide_id}.h5", coords=coords, features=rows, attrs=_slide_attrs(slide_id, 8192 + number))
    return paths, features


@pytest.mark.parametrize("method", ["mean", "max", "mean+max"])
def test_slide_pooling_methods(slide_files, tmp_path, method):
    paths, features = slide_files
    rows = features["slide_a"].astype(np.float64)
    expected = {"mean": rows.mean(axis=0), "max": rows.max(axis=0), "mean+max": np.concatenate([rows.mean(axis=0), rows.max(axis=0)])}[method]

    out = pool_slide_file(paths["slide_a"], tmp_path / "slides" / "slide_a.h5", method=method)

    pooled = read_features(out)
    assert pooled.features.shape == (1, expected.shape[0])
    assert pooled.features.dtype == np.float32
    np.testing.assert_allclose(pooled.features[0], expected, rtol=1e-6)
    assert pooled.coords.shape == (7, 2)
    assert pooled.attrs["pooling"] == method
    assert pooled.attrs["fusion"] == "none"
    assert pooled.attrs["encoder"] == ENCODER
    assert pooled.attrs["patch_count"] == 7
    assert pooled.attrs["pooled"] is True
    assert pooled.attrs["level0_width"] == 8192
    assert pooled.attrs["mpp"] == 0.25


def test_pooled_file_layout_on_disk(slide_files, tmp_path):
    paths, _ = slide_files

    out = pool_slide_file(paths["slide_b"], tmp_path / "slide_b.h5")

    with h5py.File(out, "r") as file:
        assert file["features"].shape == (1, 48)
        assert file["features"].dtype == np.float32
        assert file["coords"].dtype == np.int64
        assert file["coords"].attrs["patch_size"] == 224
        assert file.attrs["pooling"] == "mean"


@pytest.mark.parametrize("method", ["mean", "max", "mean+max"])
def test_case_fusion_modes(slide_files, tmp_path, method):
    paths, features = slide_files
    a = features["slide_a"].astype(np.float64)
    b = features["slide_b"].astype(np.float64)
    both = np.concatenate([a, b])

    def pool(rows):
        return {"mean": rows.mean(axis=0), "max": rows.max(axis=0), "mean+max": np.concatenate([rows.mean(axis=0), rows.max(axis=0)])}[method]

    early = read_features(pool_case_files(paths, tmp_path / "early.h5", case_id="case1", method=method, fusion="early"))
    late = read_features(pool_case_files(paths, tmp_path / "late.h5", case_id="case1", method=method, fusion="late"))

    np.testing.assert_allclose(early.features[0], pool(both), rtol=1e-6)
    np.testing.assert_allclose(late.features[0], (pool(a) + pool(b)) / 2.0, rtol=1e-6)
    assert not np.allclose(early.features, late.features)
    for pooled, fusion in ((early, "early"), (late, "late")):
        assert pooled.attrs["fusion"] == fusion
        assert pooled.attrs["pooling"] == method
        assert pooled.attrs["encoder"] == ENCODER
        assert pooled.attrs["case_id"] == "case1"
        assert pooled.attrs["name"] == "case1"
        assert json.loads(pooled.attrs["slide_ids"]) == ["slide_a", "slide_b"]
        assert pooled.attrs["patch_count"] == 10
        assert pooled.coords.shape == (10, 2)
        # Attributes on which the slides agree are kept; those that differ per slide are dropped.
        assert pooled.attrs["patch_size"] == 224
        assert "level0_width" not in pooled.attrs


def test_early_max_of_one_slide(slide_files, tmp_path):
    paths, features = slide_files

    case = read_features(pool_case_files({"slide_a": paths["slide_a"]}, tmp_path / "c.h5", case_id="c", method="max", fusion="early"))

    np.testing.assert_allclose(case.features[0], features["slide_a"].max(axis=0))


def test_late_fusion_of_pooled_slides(slide_files, tmp_path):
    paths, _ = slide_files
    pooled = {slide_id: pool_slide_file(path, tmp_path / "slides" / f"{slide_id}.h5", method="mean+max") for slide_id, path in paths.items()}

    from_slides = read_features(pool_case_files(pooled, tmp_path / "a.h5", case_id="c", method="mean+max", fusion="late"))
    from_patches = read_features(pool_case_files(paths, tmp_path / "b.h5", case_id="c", method="mean+max", fusion="late"))

    np.testing.assert_allclose(from_slides.features, from_patches.features, rtol=1e-6)
    assert from_slides.attrs["patch_count"] == 10


def test_early_fusion_rejects_pooled_slides(slide_files, tmp_path):
    paths, _ = slide_files
    pooled = {"slide_a": pool_slide_file(paths["slide_a"], tmp_path / "slide_a.h5"), "slide_b": paths["slide_b"]}

    with pytest.raises(ConfigError, match="slide 'slide_a' contains pooled slide features, but early fusion"):
        pool_case_files(pooled, tmp_path / "c.h5", case_id="c", fusion="early")


def test_late_fusion_rejects_other_pooling(slide_files, tmp_path):
    paths, _ = slide_files
    pooled = {"slide_a": pool_slide_file(paths["slide_a"], tmp_path / "slide_a.h5", method="max"), "slide_b": paths["slide_b"]}

    with pytest.raises(ConfigError, match="pooled with pooling='max', but this case is pooled with 'mean'"):
        pool_case_files(pooled, tmp_path / "c.h5", case_id="c", method="mean", fusion="late")


def test_pooling_rejects_two_encoders(slide_files, tmp_path):
    paths, features = slide_files
    other = write_features(
        tmp_path / "other.h5", coords=np.zeros((3, 2), dtype=np.int64), features=features["slide_b"], attrs={**_slide_attrs("o", 1), "encoder": "uni2-h"}
    )

    with pytest.raises(ConfigError, match="different encoders"):
        pool_case_files({"slide_a": paths["slide_a"], "other": other}, tmp_path / "c.h5", case_id="c")


def test_missing_encoder_needs_option(histograms, tmp_path):
    attrs = {key: value for key, value in _slide_attrs("s", 1).items() if key != "encoder"}
    path = write_features(tmp_path / "s.h5", coords=np.zeros((2, 2), dtype=np.int64), features=histograms[:2], attrs=attrs)

    with pytest.raises(ConfigError, match="has no encoder attribute"):
        pool_slide_file(path, tmp_path / "out.h5")
    pooled = read_features(pool_slide_file(path, tmp_path / "out.h5", encoder="trident-conch"))
    assert pooled.attrs["encoder"] == "trident-conch"


def test_pool_patch_features_rejects_bad_input():
    with pytest.raises(ConfigError, match="pooling is 'median'"):
        pool_patch_features(np.ones((2, 3)), "median")
    with pytest.raises(ConfigError, match="0 patches"):
        pool_patch_features(np.ones((0, 3)))


def test_case_map_errors(tmp_path):
    missing = tmp_path / "missing.csv"
    missing.write_text("slide,case_id\ns1,c1\n")
    conflict = tmp_path / "conflict.csv"
    conflict.write_text("slide_id,case_id\ns1,c1\ns2,c1\ns1,c2\n")

    with pytest.raises(ConfigError, match="has no column slide_id"):
        read_case_map(missing)
    with pytest.raises(ConfigError, match=r"line 4: slide_id 's1' is mapped to case 'c2' and earlier to case 'c1'"):
        read_case_map(conflict)


def _run_pool(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unite_cli.main", "pool", *arguments], capture_output=True, text=True, timeout=120)


def test_unite_pool_slides_and_cases(slide_files, tmp_path):
    paths, features = slide_files
    folder = paths["slide_a"].parent
    cases = tmp_path / "cases.csv"
    cases.write_text("slide_id,case_id,site\nslide_a,case1,lung\nslide_b,case1,lung\n")

    slides = _run_pool(str(folder), "--out", str(tmp_path / "slides"), "--pooling", "mean+max")
    case = _run_pool(str(folder), "--out", str(tmp_path / "cases"), "--cases", str(cases), "--fusion", "early", "--pooling", "max")

    assert slides.returncode == 0, slides.stderr
    assert slides.stdout.strip() == f"pooled 2 slides with mean+max pooling into {tmp_path / 'slides'}"
    slide_a = read_features(tmp_path / "slides" / "slide_a.h5")
    assert slide_a.features.shape == (1, 96)
    np.testing.assert_allclose(slide_a.features[0, 48:], features["slide_a"].max(axis=0))
    assert case.returncode == 0, case.stderr
    case1 = read_features(tmp_path / "cases" / "case1.h5")
    np.testing.assert_allclose(case1.features[0], np.concatenate([features["slide_a"], features["slide_b"]]).max(axis=0))
    assert case1.attrs["fusion"] == "early"


def test_unite_pool_missing_slide(slide_files, tmp_path):
    paths, _ = slide_files
    cases = tmp_path / "cases.csv"
    cases.write_text("slide_id,case_id\nslide_a,case1\nslide_z,case1\n")

    completed = _run_pool(str(paths["slide_a"]), "--out", str(tmp_path / "out"), "--cases", str(cases))

    assert completed.returncode == 2
    assert "lists 1 slides with no feature file among the inputs (first: ['slide_z'])" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "out" / "case1.h5").exists()
