"""The slide pipeline on the real CMU-1 slide with a real exported student: outputs, pooling, map, stopping.

The student is a one-block UNITE ViT with random weights, exported once per module, so a slide of 58
patches embeds in about a second. Every expected value is computed independently: the tiles are read
again with ``iter_tiles`` and embedded with ``embed_tiles`` on the loaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from slide_data import CMU1, TCGA

from shared.checkpoint import load_student, save_student
from shared.errors import ConfigError, SlideError
from shared.features import read_features
from shared.models.inference import embed_tiles
from shared.models.student import UNITE_STUDENT_KWARGS, UNITE_STUDENT_NAME, build_unite_student
from shared.slides.reader import open_slide
from shared.slides.tiling import iter_tiles
from student_server.errors import TooManyPatchesError
from student_server.slide_pipeline import (
    OUTPUT_FILES,
    LocalEmbedder,
    SlideInterrupted,
    SlidePipelineOptions,
    embedding_map,
    pool_features,
    run_slide_pipeline,
)

BATCH_SIZE = 16


def save_tiny_student(folder: Path, seed: int = 0) -> Path:
    """Export a one-block UNITE student with random weights: 384-d embeddings, fast on a CPU."""
    torch.manual_seed(seed)
    return save_student(
        build_unite_student(depth=1),
        folder,
        architecture=UNITE_STUDENT_NAME,
        architecture_kwargs={**UNITE_STUDENT_KWARGS, "depth": 1},
        teacher="test-teacher/v1",
        teacher_licence="test",
        training={},
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("checkpoint") / "student")


@pytest.fixture(scope="module")
def embedder(checkpoint) -> LocalEmbedder:
    return LocalEmbedder(checkpoint, batch_size=BATCH_SIZE)


@pytest.fixture(scope="module")
def cmu1(slides_dir) -> Path:
    return slides_dir / CMU1


@pytest.fixture(scope="module")
def cmu1_tiles(cmu1, cmu1_tiled) -> np.ndarray:
    with open_slide(cmu1) as slide:
        return np.concatenate([tiles for _, tiles in iter_tiles(slide, cmu1_tiled.grid, batch_size=64)])


@pytest.fixture(scope="module")
def mean_run(cmu1, embedder, tmp_path_factory):
    """Run the pipeline once with mean pooling, recording every progress call."""
    out_dir = tmp_path_factory.mktemp("mean")
    calls: list[tuple[int, int]] = []
    options = SlidePipelineOptions(pooling="mean", batch_size=BATCH_SIZE, read_workers=2)
    result = run_slide_pipeline(cmu1, out_dir, embedder, options, progress=lambda done, total: calls.append((done, total)))
    return result, out_dir, calls


def test_features_equal_direct_embedding(mean_run, embedder, cmu1_tiled, cmu1_tiles):
    result, out_dir, _ = mean_run
    expected = embed_tiles(embedder.student.model, cmu1_tiles, batch_size=BATCH_SIZE)

    written = read_features(out_dir / "features.h5")

    np.testing.assert_array_equal(written.coords, cmu1_tiled.grid.coords)
    assert written.features.shape == (len(cmu1_tiled.grid), 384)
    np.testing.assert_allclose(written.features, expected, rtol=0, atol=1e-6)
    assert result.num_patches == len(cmu1_tiled.grid)
    assert result.embedding_dim == 384


def test_features_file_has_trident_attrs(mean_run, embedder, cmu1_tiled):
    result, out_dir, _ = mean_run
    student = embedder.student

    attrs = read_features(out_dir / "features.h5").attrs

    assert attrs["encoder"] == f"{student.name} sha256:{student.sha256}"
    assert result.encoder == attrs["encoder"]
    assert attrs["patch_size"] == 224
    assert attrs["patch_size_level0"] == cmu1_tiled.grid.patch_size_level0
    assert attrs["target_magnification"] == 20
    assert attrs["level0_width"] == cmu1_tiled.info.level0_width
    assert attrs["level0_height"] == cmu1_tiled.info.level0_height
    assert attrs["mpp"] == pytest.approx(cmu1_tiled.info.mpp)


def test_mean_pooling_is_row_mean(mean_run):
    _, out_dir, _ = mean_run
    features = read_features(out_dir / "features.h5").features

    pooled = read_features(out_dir / "slide.h5")

    assert pooled.features.shape == (1, 384)
    assert pooled.attrs["pooling"] == "mean"
    assert pooled.attrs["pooled"] is True
    np.testing.assert_allclose(pooled.features[0], features.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_max_pooling_with_one_reader(cmu1, embedder, mean_run, tmp_path):
    # One reader thread takes the read-ahead path of the pipeline, which must give the same rows.
    _, mean_dir, _ = mean_run
    options = SlidePipelineOptions(pooling="max", batch_size=BATCH_SIZE, read_workers=1)

    run_slide_pipeline(cmu1, tmp_path, embedder, options)

    features = read_features(tmp_path / "features.h5").features
    np.testing.assert_array_equal(features, read_features(mean_dir / "features.h5").features)
    pooled = read_features(tmp_path / "slide.h5")
    assert pooled.attrs["pooling"] == "max"
    np.testing.assert_array_equal(pooled.features[0], features.max(axis=0))


def test_mean_max_pooling_concatenates(mean_run):
    _, out_dir, _ = mean_run
    features = read_features(out_dir / "features.h5").features

    pooled = pool_features(features, "mean+max")

    assert pooled.shape == (1, 768)
    np.testing.assert_allclose(pooled[0, :384], features.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pooled[0, 384:], features.max(axis=0))


@pytest.mark.parametrize("pooling", ["sum", "", "MEAN"])
def test_invalid_pooling_rejected(cmu1, embedder, tmp_path, pooling):
    with pytest.raises(ConfigError, match="mean, max, mean\\+max"):
        run_slide_pipeline(cmu1, tmp_path / "out", embedder, SlidePipelineOptions(pooling=pooling))

    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["true", 1, None])
def test_invalid_allow_fluorescence_rejected(cmu1, embedder, tmp_path, value):
    with pytest.raises(ConfigError, match="must be True or False"):
        run_slide_pipeline(cmu1, tmp_path / "out", embedder, SlidePipelineOptions(allow_fluorescence=value))

    assert not (tmp_path / "out").exists()


def test_map_has_point_per_patch(mean_run, cmu1_tiled):
    result, out_dir, _ = mean_run
    grid = cmu1_tiled.grid

    embedding_map_json = json.loads((out_dir / "map.json").read_text())

    points = embedding_map_json["points"]
    assert embedding_map_json["method"] == "pca"
    assert embedding_map_json["clusters"] == min(8, result.num_patches)
    assert len(points) == result.num_patches
    assert {point["cluster"] for point in points} <= set(range(embedding_map_json["clusters"]))
    centres = grid.coords + grid.patch_size_level0 / 2
    np.testing.assert_allclose([[point["px"], point["py"]] for point in points], centres)


def test_map_coordinates_are_principal_components(mean_run):
    _, out_dir, _ = mean_run
    features = read_features(out_dir / "features.h5").features.astype(np.float64)
    points = json.loads((out_dir / "map.json").read_text())["points"]
    centred = features - features.mean(axis=0)
    _, singular_values, _ = np.linalg.svd(centred, full_matrices=False)

    layout = np.array([[point["x"], point["y"]] for point in points])

    # The projections on the first two principal axes have norms equal to the two largest singular values.
    np.testing.assert_allclose(np.linalg.norm(layout, axis=0), singular_values[:2], rtol=1e-4)
    assert abs(float(layout[:, 0] @ layout[:, 1])) < 1e-6 * singular_values[0] ** 2


def test_map_single_patch():
    features = np.arange(384, dtype=np.float32).reshape(1, 384)

    single = embedding_map(features, np.array([[100, 200]]), 448)

    assert single["clusters"] == 1
    assert single["points"] == [{"x": 0.0, "y": 0.0, "px": 324.0, "py": 424.0, "cluster": 0}]


def test_result_json_matches_outputs(mean_run, cmu1, embedder):
    result, out_dir, _ = mean_run
    text = (out_dir / "result.json").read_text()
    written = json.loads(text)
    pooled = read_features(out_dir / "slide.h5").features[0]

    assert written["slide_id"] == result.slide_id
    assert written["num_patches"] == result.num_patches
    assert written["checkpoint_sha256"] == embedder.student.sha256
    assert written["metadata"]["pooled_dim"] == 384
    np.testing.assert_allclose(written["slide_embedding"], pooled, rtol=1e-6)
    # The slide is named by its pseudonymous id only, never by its file name or path.
    assert cmu1.stem not in text
    assert str(cmu1.parent) not in text


def test_writes_every_output_file(mean_run):
    result, out_dir, _ = mean_run

    assert sorted(path.name for path in out_dir.iterdir()) == sorted(OUTPUT_FILES.values())
    assert result.outputs == {kind: out_dir / name for kind, name in OUTPUT_FILES.items()}
    assert (out_dir / "thumbnail.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert (out_dir / "overlay.jpg").read_bytes()[:2] == b"\xff\xd8"


def test_progress_reaches_total(mean_run):
    result, _, calls = mean_run
    total = result.num_patches

    assert calls[0] == (0, total)
    assert calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert {seen_total for _, seen_total in calls} == {total}
    assert len(calls) == 1 + -(-total // BATCH_SIZE)


def test_should_stop_mid_slide_writes_nothing(cmu1, embedder, tmp_path):
    calls: list[tuple[int, int]] = []
    checks = []

    def stop_at_third_batch() -> bool:
        checks.append(True)
        return len(checks) > 3

    out_dir = tmp_path / "out"
    with pytest.raises(SlideInterrupted) as raised:
        run_slide_pipeline(
            cmu1, out_dir, embedder, SlidePipelineOptions(batch_size=8), progress=lambda *call: calls.append(call), should_stop=stop_at_third_batch
        )

    # The first check comes before the first batch, so two batches of 8 were embedded.
    assert raised.value.value == 16
    assert calls[-1][0] == 16
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_too_many_patches_rejected(cmu1, embedder, tmp_path):
    with pytest.raises(TooManyPatchesError) as raised:
        run_slide_pipeline(cmu1, tmp_path / "out", embedder, SlidePipelineOptions(max_patches=10))

    assert raised.value.limit == 10
    assert raised.value.value > 10
    assert not (tmp_path / "out").exists()


def test_slide_without_resolution_rejected(slides_dir, embedder, tmp_path):
    with pytest.raises(SlideError) as raised:
        run_slide_pipeline(slides_dir / TCGA, tmp_path / "out", embedder, SlidePipelineOptions())

    assert raised.value.reason == "no_resolution"
    assert not (tmp_path / "out").exists()


class SwitchingEmbedder:
    """Embeds the first batch with one real student and every later batch with another, as a hot reload would."""

    def __init__(self, first: LocalEmbedder, second: LocalEmbedder) -> None:
        self.first, self.second = first, second
        self.calls = 0

    def embed_tiles(self, tiles: np.ndarray) -> tuple[np.ndarray, str, str]:
        self.calls += 1
        return (self.first if self.calls == 1 else self.second).embed_tiles(tiles)


def test_checkpoint_switch_restarts_slide(cmu1, embedder, cmu1_tiles, tmp_path):
    other = LocalEmbedder(save_tiny_student(tmp_path / "other", seed=1), batch_size=BATCH_SIZE)
    switching = SwitchingEmbedder(embedder, other)

    result = run_slide_pipeline(cmu1, tmp_path / "out", switching, SlidePipelineOptions(batch_size=BATCH_SIZE))

    written = read_features(tmp_path / "out" / "features.h5")
    assert written.attrs["encoder"] == f"{other.student.name} sha256:{other.student.sha256}"
    assert result.encoder == written.attrs["encoder"]
    expected = embed_tiles(load_student(other.student.folder).model, cmu1_tiles, batch_size=BATCH_SIZE)
    np.testing.assert_allclose(written.features, expected, rtol=0, atol=1e-6)
