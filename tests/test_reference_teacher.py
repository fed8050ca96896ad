"""The built-in reference teacher: contract, determinism, input checks, and real signal on labelled lung tiles."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from shared.errors import ConfigError, ImageError
from shared.imaging import decode_image, prepare_tile
from teacher_gateway.teachers.base import Teacher
from teacher_gateway.teachers.reference import (
    DESCRIPTOR_DIM,
    DESCRIPTOR_GROUPS,
    REFERENCE_TEACHER_VERSION,
    ReferenceTeacher,
    describe_tile,
)
from teacher_gateway.teachers.registry import available_teachers, build_teacher

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
LUNG_TILES = Path("tiles") / "lc25000_lung_dedup"
PROBE_SEED = 0
# Loose floor on the embedding rate: the target is 100 tiles/s on one idle core, and the floor only
# catches a regression by an order of magnitude on a busy CI machine.
MIN_TILES_PER_SECOND = 20.0

# The first coordinates of the embedding of synthetic_he_tile(spacing=28), computed with version 1.
# A change of any descriptor, of a constant or of numpy's normal stream moves them. Then bump
# REFERENCE_TEACHER_VERSION, because the cache keys embeddings by the identity, and update these values.
# The tolerance absorbs float32 rounding across CPUs, which can move a pixel across a bin edge.
PINNED_VERSION = 1
PINNED_COORDINATES = np.array([-0.7498, -0.3145, -0.7675, -0.4332, 1.2793, -0.1412, -0.7663, 0.2162])
PINNED_TOLERANCE = 2e-3


def synthetic_he_tile(spacing: int, radius: int = 6) -> np.ndarray:
    """Draw a 224 x 224 H&E-like tile: purple nuclei of ``radius`` px every ``spacing`` px on pink stroma.

    Built from arithmetic only, with no random generator, so the pixels are the same on every machine.
    """
    rows, columns = np.indices((224, 224))
    stroma = np.stack(
        [235 - (rows % 17), 160 + (columns % 13), 200 - ((rows + columns) % 11)], axis=-1
    ).astype(np.uint8)
    offset_rows = (rows % spacing) - spacing // 2
    offset_columns = (columns % spacing) - spacing // 2
    nuclei = offset_rows**2 + offset_columns**2 <= radius**2
    tile = stroma.copy()
    tile[nuclei] = (95, 60, 150)
    return tile


def edge_case_tiles() -> np.ndarray:
    """Return tiles that stress the descriptors: white glass, black, flat grey, hashed noise, one red pixel."""
    rows, columns = np.indices((224, 224))
    noise = ((rows * 7919 + columns * 104_729 + rows * columns * 31) % 256).astype(np.uint8)
    single_pixel = np.full((224, 224, 3), 255, dtype=np.uint8)
    single_pixel[100, 100] = (255, 0, 0)
    return np.stack(
        [
            np.full((224, 224, 3), 255, dtype=np.uint8),
            np.zeros((224, 224, 3), dtype=np.uint8),
            np.full((224, 224, 3), 128, dtype=np.uint8),
            np.stack([noise, noise[::-1], noise[:, ::-1]], axis=-1),
            single_pixel,
        ]
    )


@pytest.fixture(scope="module")
def teacher() -> ReferenceTeacher:
    return ReferenceTeacher()


# Contract


def test_teacher_follows_protocol(teacher: ReferenceTeacher) -> None:
    assert isinstance(teacher, Teacher)
    assert teacher.dim == 1536
    assert teacher.name == "reference"
    assert teacher.licence


def test_identity_never_claims_uni2(teacher: ReferenceTeacher) -> None:
    assert "UNI" not in teacher.identity
    assert "uni2" not in teacher.identity.lower()
    assert "reference" in teacher.identity
    assert teacher.identity.endswith(f"/v{REFERENCE_TEACHER_VERSION}")


def test_descriptor_matches_declared_groups() -> None:
    descriptor = describe_tile(synthetic_he_tile(spacing=28))

    assert descriptor.shape == (DESCRIPTOR_DIM,)
    assert DESCRIPTOR_DIM == sum(DESCRIPTOR_GROUPS.values())


def test_embedding_shape_dtype_and_finite(teacher: ReferenceTeacher) -> None:
    tiles = np.concatenate([synthetic_he_tile(spacing=28)[None], edge_case_tiles()])

    embeddings = teacher.embed(tiles)

    assert embeddings.shape == (len(tiles), 1536)
    assert embeddings.dtype == np.float32
    assert np.isfinite(embeddings).all()


def test_empty_batch_gives_empty_embeddings(teacher: ReferenceTeacher) -> None:
    embeddings = teacher.embed(np.zeros((0, 224, 224, 3), dtype=np.uint8))

    assert embeddings.shape == (0, 1536)
    assert embeddings.dtype == np.float32


def test_different_tiles_give_different_embeddings(teacher: ReferenceTeacher) -> None:
    sparse, dense = teacher.embed(np.stack([synthetic_he_tile(spacing=40), synthetic_he_tile(spacing=20)]))
    white = teacher.embed(edge_case_tiles()[:1])[0]

    nuclei_distance = float(np.linalg.norm(sparse - dense))
    tissue_to_glass = float(np.linalg.norm(sparse - white))
    assert nuclei_distance > 0.1 * float(np.linalg.norm(sparse)), (nuclei_distance, float(np.linalg.norm(sparse)))
    assert tissue_to_glass > nuclei_distance, (tissue_to_glass, nuclei_distance)


# Determinism


def test_same_tile_is_bit_identical_across_calls(teacher: ReferenceTeacher) -> None:
    tile = synthetic_he_tile(spacing=28)

    first = teacher.embed(tile[None])
    second = ReferenceTeacher().embed(tile[None])

    assert first.tobytes() == second.tobytes()


def test_embedding_does_not_depend_on_batch(teacher: ReferenceTeacher) -> None:
    tiles = np.concatenate([edge_case_tiles(), synthetic_he_tile(spacing=28)[None]])

    batched = teacher.embed(tiles)
    alone = np.concatenate([teacher.embed(tile[None]) for tile in tiles])
    reversed_batch = teacher.embed(np.ascontiguousarray(tiles[::-1]))[::-1]

    assert batched.tobytes() == alone.tobytes()
    assert batched.tobytes() == reversed_batch.tobytes()


CHILD_SCRIPT = """
import json, sys
import numpy as np
from teacher_gateway.teachers.reference import ReferenceTeacher
tiles = np.load(sys.argv[1])
np.save(sys.argv[2], ReferenceTeacher().embed(tiles))
print(json.dumps({"torch_imported": "torch" in sys.modules}))
"""


@pytest.fixture(scope="module")
def child_process_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Embed two tiles in a fresh Python process, and return the tiles, its embeddings and what it imported."""
    folder = tmp_path_factory.mktemp("child")
    tiles = np.stack([synthetic_he_tile(spacing=28), edge_case_tiles()[3]])
    np.save(folder / "tiles.npy", tiles)
    # The child gets one BLAS and OpenMP thread, which this process may not have, so the test also shows
    # that the embedding does not depend on the thread count.
    environment = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", CHILD_SCRIPT, str(folder / "tiles.npy"), str(folder / "embeddings.npy")],
        cwd=REPOSITORY_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    return {"tiles": tiles, "embeddings": np.load(folder / "embeddings.npy"), **report}


def test_embedding_is_bit_identical_in_new_process(teacher: ReferenceTeacher, child_process_run: dict) -> None:
    in_this_process = teacher.embed(child_process_run["tiles"])

    assert in_this_process.tobytes() == child_process_run["embeddings"].tobytes()


def test_reference_teacher_imports_no_torch(child_process_run: dict) -> None:
    assert child_process_run["torch_imported"] is False


def test_pinned_embedding_values(teacher: ReferenceTeacher) -> None:
    embedding = teacher.embed(synthetic_he_tile(spacing=28)[None])[0]
    found = embedding[: len(PINNED_COORDINATES)]

    assert REFERENCE_TEACHER_VERSION == PINNED_VERSION, "update PINNED_COORDINATES for the new version"
    assert np.allclose(found, PINNED_COORDINATES, rtol=0.0, atol=PINNED_TOLERANCE), (
        f"embedding moved without a version bump: found {found.tolist()}, pinned {PINNED_COORDINATES.tolist()}. "
        "Bump REFERENCE_TEACHER_VERSION and update the pinned values."
    )


# Input checks


@pytest.mark.parametrize(
    ("tiles", "expected_text"),
    [
        (np.zeros((224, 224, 3), dtype=np.uint8), "expected (N, 224, 224, 3)"),
        (np.zeros((1, 224, 224, 4), dtype=np.uint8), "expected (N, 224, 224, 3)"),
        (np.zeros((1, 112, 112, 3), dtype=np.uint8), "expected (N, 224, 224, 3)"),
        (np.zeros((1, 3, 224, 224), dtype=np.uint8), "expected (N, 224, 224, 3)"),
        (np.zeros((1, 224, 224, 3), dtype=np.float32), "expected uint8"),
        (np.zeros((1, 224, 224, 3), dtype=np.uint16), "expected uint8"),
        ([np.zeros((224, 224, 3), dtype=np.uint8)], "expected a numpy array"),
    ],
    ids=["no-batch-axis", "rgba", "112px", "channels-first", "float32", "uint16", "list"],
)
def test_rejects_invalid_batch(teacher: ReferenceTeacher, tiles: object, expected_text: str) -> None:
    with pytest.raises(ImageError) as raised:
        teacher.embed(tiles)

    assert expected_text in raised.value.message
    assert raised.value.code == "invalid_image"


# Registry


def test_registry_builds_reference_teacher() -> None:
    built = build_teacher("reference")

    assert isinstance(built, ReferenceTeacher)
    assert "reference" in available_teachers()


def test_registry_rejects_unknown_name() -> None:
    with pytest.raises(ConfigError) as raised:
        build_teacher("uni3")

    assert "'uni3'" in raised.value.message
    assert "reference" in raised.value.message
    assert raised.value.limit == available_teachers()


def test_registry_rejects_reference_options() -> None:
    with pytest.raises(ConfigError) as raised:
        build_teacher("reference", weights="model.safetensors")

    assert "weights" in raised.value.message


# Real signal on labelled lung tiles


def load_lung_tiles(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return the (300, 224, 224, 3) uint8 lung tiles and their class labels, in labels.csv order."""
    folder = shared_data / LUNG_TILES
    if not (folder / "labels.csv").is_file():
        pytest.skip(f"labelled lung tiles not found at {folder}")
    with open(folder / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    tiles = [prepare_tile(decode_image((folder / row["path"]).read_bytes(), name=row["path"])) for row in rows]
    return np.stack(tiles), np.array([row["label"] for row in rows])


def rgb_histograms(tiles: np.ndarray) -> np.ndarray:
    """Return the 48-bin colour histogram of each tile: 16 bins per RGB channel, as fractions of its pixels."""
    pixels_per_tile = tiles.shape[1] * tiles.shape[2]
    histograms = [
        np.concatenate([np.bincount(tile[..., channel].ravel() >> 4, minlength=16) for channel in range(3)])
        for tile in tiles
    ]
    return np.stack(histograms) / pixels_per_tile


def linear_probe_balanced_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Return the mean balanced accuracy of StandardScaler + LogisticRegression over 5 stratified folds."""
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=PROBE_SEED)
    scores = []
    # One BLAS thread: on a busy 2-core machine, two threads made these small fits 30 times slower.
    with threadpool_limits(limits=1):
        for train, test in folds.split(features, labels):
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=10_000))
            probe.fit(features[train], labels[train])
            scores.append(balanced_accuracy_score(labels[test], probe.predict(features[test])))
    return float(np.mean(scores))


def test_linear_probe_beats_colour_histogram(teacher: ReferenceTeacher, shared_data: Path) -> None:
    tiles, labels = load_lung_tiles(shared_data)

    started = time.perf_counter()
    embeddings = teacher.embed(tiles)
    tiles_per_second = len(tiles) / (time.perf_counter() - started)

    teacher_accuracy = linear_probe_balanced_accuracy(embeddings, labels)
    histogram_accuracy = linear_probe_balanced_accuracy(rgb_histograms(tiles), labels)
    print(
        f"lung tiles ({len(tiles)}): balanced accuracy reference teacher {teacher_accuracy:.3f}, "
        f"48-bin RGB histogram {histogram_accuracy:.3f}; embedding rate {tiles_per_second:.0f} tiles/s"
    )
    assert teacher_accuracy >= histogram_accuracy, (teacher_accuracy, histogram_accuracy)
    assert tiles_per_second >= MIN_TILES_PER_SECOND, tiles_per_second
