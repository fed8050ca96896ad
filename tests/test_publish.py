"""Tests of shared.publish: atomic publishing under a concurrent reader, pruning, and rejected exports.

Exports are real students saved with save_student (timm's test_vit, 0.3 M parameters, so each save is fast).
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from shared.checkpoint import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS, file_sha256, load_student, save_student
from shared.errors import ConfigError
from shared.models.student import build_student
from shared.publish import CURRENT_LINK, VERSIONS_DIR, current_version, publish_student, resolve_checkpoint_dir

SMALL_STUDENT = "test_vit"


def save_small_student(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_student(build_student(SMALL_STUDENT), folder, teacher="test-teacher/v1", teacher_licence="test", training={"seed": seed}, student=SMALL_STUDENT)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> list[Path]:
    """Six exports of different weights."""
    folder = tmp_path_factory.mktemp("exports")
    return [save_small_student(folder / f"student-{seed}", seed) for seed in range(6)]


def published_versions(root: Path) -> list[str]:
    return sorted(path.name for path in (root / VERSIONS_DIR).iterdir())


def test_publish_points_current_at_copy(exports, tmp_path):
    version = publish_student(exports[0], tmp_path)

    assert (tmp_path / CURRENT_LINK).is_symlink()
    assert current_version(tmp_path) == version
    assert resolve_checkpoint_dir(tmp_path) == version
    assert file_sha256(version / CHECKPOINT_WEIGHTS) == file_sha256(exports[0] / CHECKPOINT_WEIGHTS)
    assert load_student(version).sha256 == file_sha256(exports[0] / CHECKPOINT_WEIGHTS)


def test_resolve_plain_export_folder(exports):
    assert resolve_checkpoint_dir(exports[0]) == exports[0].resolve()


def test_publish_while_reader_resolves_current(exports, tmp_path):
    # No pruning here (keep above the count), so any failure of the reader is a half-published version.
    publish_student(exports[0], tmp_path, keep=100)
    problems: list[str] = []
    seen: set[str] = set()
    done = threading.Event()

    def read_current() -> None:
        while not done.is_set():
            folder = resolve_checkpoint_dir(tmp_path)
            try:
                recorded = json.loads((folder / CHECKPOINT_CONFIG).read_text())["weights_sha256"]
                actual = file_sha256(folder / CHECKPOINT_WEIGHTS)
            except (OSError, ValueError, KeyError) as error:
                problems.append(f"{folder}: {error!r}")
                continue
            if recorded != actual:
                problems.append(f"{folder}: config.json records {recorded}, weights have {actual}")
            seen.add(actual)

    reader = threading.Thread(target=read_current)
    reader.start()
    try:
        for round_number in range(4):
            for export in exports:
                publish_student(export, tmp_path, keep=100)
    finally:
        done.set()
        reader.join(timeout=60)

    assert not problems, problems[:5]
    assert len(seen) >= 2, f"the reader saw only {len(seen)} version(s); the test did not overlap with publishing"
    assert file_sha256(resolve_checkpoint_dir(tmp_path) / CHECKPOINT_WEIGHTS) == file_sha256(exports[-1] / CHECKPOINT_WEIGHTS)


def test_prune_keeps_current_and_newest(exports, tmp_path):
    versions = [publish_student(export, tmp_path, keep=2) for export in exports]

    remaining = published_versions(tmp_path)
    assert remaining == [versions[-2].name, versions[-1].name]
    assert current_version(tmp_path) == versions[-1]


def test_prune_keep_one_leaves_current(exports, tmp_path):
    for export in exports[:3]:
        last = publish_student(export, tmp_path, keep=1)

    assert published_versions(tmp_path) == [last.name]
    assert load_student(resolve_checkpoint_dir(tmp_path)).sha256 == file_sha256(exports[2] / CHECKPOINT_WEIGHTS)


def test_republish_current_is_no_op(exports, tmp_path):
    first = publish_student(exports[0], tmp_path)
    again = publish_student(exports[0], tmp_path)

    assert again == first
    assert published_versions(tmp_path) == [first.name]


def test_publish_rejects_folder_without_weights(exports, tmp_path):
    folder = tmp_path / "not-an-export"
    folder.mkdir()
    (folder / CHECKPOINT_CONFIG).write_text("{}")

    with pytest.raises(ConfigError, match=r"cannot publish .*not-an-export: it has no model\.safetensors.*Export the student first") as raised:
        publish_student(folder, tmp_path / "root")

    assert raised.value.value == str(folder)
    assert not (tmp_path / "root" / CURRENT_LINK).exists()


def test_publish_rejects_mismatched_config(exports, tmp_path):
    folder = tmp_path / "changed"
    save_small_student(folder, 0)
    config = json.loads((folder / CHECKPOINT_CONFIG).read_text())
    config["weights_sha256"] = "0" * 64
    (folder / CHECKPOINT_CONFIG).write_text(json.dumps(config))

    with pytest.raises(ConfigError, match="records weights_sha256 '0000"):
        publish_student(folder, tmp_path / "root")

    assert not (tmp_path / "root" / CURRENT_LINK).exists()


def test_publish_rejects_keep_below_one(exports, tmp_path):
    with pytest.raises(ConfigError, match="keep is 0, expected at least 1"):
        publish_student(exports[0], tmp_path, keep=0)


def save_deeper_config(source: Path, folder: Path) -> Path:
    """Copy the export at ``source`` to ``folder`` with a config.json whose architecture its weights do not fit."""
    shutil.copytree(source, folder)
    config = json.loads((folder / CHECKPOINT_CONFIG).read_text())
    config.setdefault("architecture_kwargs", {})["depth"] = config.get("architecture_kwargs", {}).get("depth", 1) + 2
    (folder / CHECKPOINT_CONFIG).write_text(json.dumps(config))
    return folder


def test_publish_rejects_export_that_does_not_load(exports, tmp_path):
    first = publish_student(exports[0], tmp_path / "root")
    broken = save_deeper_config(exports[1], tmp_path / "broken")

    with pytest.raises(ConfigError, match=r"cannot publish .*broken: the student server could not load it") as raised:
        publish_student(broken, tmp_path / "root")

    assert raised.value.value == str(broken)
    assert current_version(tmp_path / "root") == first


def test_publish_same_weights_other_config_is_new_version(exports, tmp_path):
    first = publish_student(exports[0], tmp_path)
    changed = tmp_path / "changed"
    shutil.copytree(exports[0], changed)
    config = json.loads((changed / CHECKPOINT_CONFIG).read_text())
    config["teacher_licence"] = "test, second wording"
    (changed / CHECKPOINT_CONFIG).write_text(json.dumps(config))

    second = publish_student(changed, tmp_path)

    assert second != first
    assert current_version(tmp_path) == second
    assert (second / CHECKPOINT_CONFIG).read_bytes() == (changed / CHECKPOINT_CONFIG).read_bytes()
