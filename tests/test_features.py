"""TRIDENT-layout feature files: round trips, attribute placement and errors."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from shared.errors import CacheError, ConfigError
from shared.features import read_features, trident_attrs, write_features
from shared.slides import tile_slide

ENCODER = "unite-student-vit-s14 sha256:0123456789abcdef"
TRIDENT_KEYS = {
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "name",
    "level0_width",
    "level0_height",
}


@pytest.fixture(scope="module")
def cmu1_tiled(shared_data: Path):
    return tile_slide(shared_data / "slides" / "CMU-1-Small-Region.svs")


@pytest.fixture(scope="module")
def cmu1_attrs(cmu1_tiled) -> dict:
    return trident_attrs(cmu1_tiled.info, cmu1_tiled.grid, encoder=ENCODER)


def test_trident_attrs_values(cmu1_attrs: dict) -> None:
    assert set(cmu1_attrs) == TRIDENT_KEYS | {"encoder", "mpp"}
    assert cmu1_attrs["patch_size"] == 224
    assert cmu1_attrs["patch_size_level0"] == 224
    assert cmu1_attrs["level0_magnification"] == 20
    assert cmu1_attrs["target_magnification"] == 20
    assert cmu1_attrs["overlap"] == 0
    assert cmu1_attrs["name"] == "CMU-1-Small-Region"
    assert cmu1_attrs["level0_width"] == 2220
    assert cmu1_attrs["level0_height"] == 2967
    assert cmu1_attrs["encoder"] == ENCODER
    assert cmu1_attrs["mpp"] == pytest.approx(0.499)


def test_features_round_trip(cmu1_tiled, cmu1_attrs: dict, tmp_path: Path) -> None:
    coords = cmu1_tiled.grid.coords
    features = np.random.default_rng(0).standard_normal((len(coords), 384)).astype(np.float32)
    path = tmp_path / "features" / "CMU-1-Small-Region.h5"

    written = write_features(path, coords=coords, features=features, attrs=cmu1_attrs)
    loaded = read_features(written)

    assert written == path
    assert loaded.coords.dtype == np.int64
    assert loaded.features.dtype == np.float32
    assert (loaded.coords == coords).all()
    assert (loaded.features == features).all()
    assert loaded.attrs == cmu1_attrs
    assert sorted(path.parent.iterdir()) == [path]


def test_attrs_on_datasets_and_root(cmu1_tiled, cmu1_attrs: dict, tmp_path: Path) -> None:
    coords = cmu1_tiled.grid.coords
    path = write_features(
        tmp_path / "slide.h5", coords=coords, features=np.zeros((len(coords), 8), np.float32), attrs=cmu1_attrs
    )

    with h5py.File(path, "r") as file:
        places = {"root": file.attrs, "coords": file["coords"].attrs, "features": file["features"].attrs}
        for place, attrs in places.items():
            assert set(attrs) == set(cmu1_attrs), place
            assert attrs["patch_size_level0"] == 224, place
            assert attrs["encoder"] == ENCODER, place
        assert file["coords"].dtype == np.int64
        assert file["features"].dtype == np.float32


def test_mismatched_rows_raise(cmu1_attrs: dict, tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    coords = np.zeros((5, 2), dtype=np.int64)
    features = np.zeros((4, 384), dtype=np.float32)

    with pytest.raises(CacheError) as raised:
        write_features(path, coords=coords, features=features, attrs=cmu1_attrs)

    message = str(raised.value)
    assert "features have 4 rows but coords have 5" in message
    assert str(path) in message
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_pooled_features_round_trip(cmu1_attrs: dict, tmp_path: Path) -> None:
    coords = np.arange(20, dtype=np.int64).reshape(10, 2)
    pooled = np.random.default_rng(1).standard_normal((1, 384)).astype(np.float32)

    path = write_features(tmp_path / "slide.h5", coords=coords, features=pooled, attrs=cmu1_attrs, pooled=True)
    loaded = read_features(path)

    assert loaded.features.shape == (1, 384)
    assert (loaded.features == pooled).all()
    assert loaded.coords.shape == (10, 2)
    assert loaded.attrs["pooled"] is True


def test_pooled_needs_one_row(cmu1_attrs: dict, tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"expected \(1, D\)"):
        write_features(
            tmp_path / "slide.h5",
            coords=np.zeros((3, 2), np.int64),
            features=np.zeros((2, 8), np.float32),
            attrs=cmu1_attrs,
            pooled=True,
        )


def test_non_finite_features_raise(cmu1_attrs: dict, tmp_path: Path) -> None:
    features = np.zeros((3, 8), np.float32)
    features[2, 5] = np.nan

    with pytest.raises(CacheError, match=r"NaN or infinity \(first row 2\)"):
        write_features(tmp_path / "slide.h5", coords=np.zeros((3, 2), np.int64), features=features, attrs=cmu1_attrs)


@pytest.mark.parametrize(
    ("coords", "expected"),
    [(np.zeros((3, 3), np.int64), r"\(3, 3\)"), (np.zeros((3, 2), np.float32), "float32")],
    ids=["three-columns", "float-coords"],
)
def test_invalid_coords_raise(cmu1_attrs: dict, tmp_path: Path, coords: np.ndarray, expected: str) -> None:
    with pytest.raises(CacheError, match=expected):
        write_features(tmp_path / "slide.h5", coords=coords, features=np.zeros((3, 8), np.float32), attrs=cmu1_attrs)


def test_invalid_attr_value_raises(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="attribute 'encoder' has a value of type NoneType"):
        write_features(
            tmp_path / "slide.h5",
            coords=np.zeros((1, 2), np.int64),
            features=np.zeros((1, 8), np.float32),
            attrs={"encoder": None},
        )


def test_empty_encoder_rejected(cmu1_tiled) -> None:
    with pytest.raises(ConfigError, match="encoder=''"):
        trident_attrs(cmu1_tiled.info, cmu1_tiled.grid, encoder="")


def test_rewrite_replaces_file(cmu1_attrs: dict, tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    coords = np.zeros((2, 2), np.int64)
    write_features(path, coords=coords, features=np.zeros((2, 4), np.float32), attrs=cmu1_attrs)

    write_features(path, coords=coords, features=np.ones((2, 4), np.float32), attrs=cmu1_attrs)

    assert (read_features(path).features == 1).all()


def test_read_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "absent.h5"

    with pytest.raises(CacheError, match=f"feature file not found: {path}"):
        read_features(path)


def test_read_non_hdf5_raises(tmp_path: Path) -> None:
    path = tmp_path / "slide.h5"
    path.write_text("not an HDF5 file\n")

    with pytest.raises(CacheError, match="cannot be read as HDF5") as raised:
        read_features(path)

    assert isinstance(raised.value.__cause__, OSError)


def test_read_without_features_dataset_raises(tmp_path: Path) -> None:
    path = tmp_path / "patches.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("coords", data=np.zeros((2, 2), np.int64))

    with pytest.raises(CacheError, match=r"no features dataset \(found: \['coords'\]\)"):
        read_features(path)


def test_reads_file_in_trident_layout(tmp_path: Path) -> None:
    # TRIDENT keeps the patching attributes on `coords` only and writes just the name on `features`.
    path = tmp_path / "slide.h5"
    coords_attrs = {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                    "target_magnification": 20, "overlap": 0, "name": "slide", "savetodir": "/jobs/patches"}
    with h5py.File(path, "w") as file:
        file.create_dataset("coords", data=np.array([[0, 0], [512, 0]], np.int64)).attrs.update(coords_attrs)
        file.create_dataset("features", data=np.ones((2, 16), np.float32)).attrs.update({"name": "slide"})

    loaded = read_features(path)

    assert loaded.attrs == coords_attrs
    assert loaded.features.shape == (2, 16)
    assert loaded.coords.tolist() == [[0, 0], [512, 0]]
