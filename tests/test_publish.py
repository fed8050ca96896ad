"""Tests of shared.publish and `unite publish`: atomic publishing under a concurrent reader, pruning, rejected
exports, listing, rollback under a running student server, and publishing an export by hand.

Exports are real students saved with save_student (timm's test_vit, 0.3 M parameters, so each save is fast).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gateway_helpers import wait_for
from servers import run_app
from student_helpers import direct_embeddings, lung_tiles, post_embeddings, response_embeddings, save_tiny_student

from shared.checkpoint import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS, file_sha256, load_student, save_student
from shared.checkpoint_format import ONNX_WEIGHTS
from shared.errors import ConfigError
from shared.models.student import build_student
from shared.publish import (
    CURRENT_LINK,
    VERSIONS_DIR,
    _point_current,
    current_version,
    list_versions,
    publish_student,
    resolve_checkpoint_dir,
    rollback_current,
)
from student_server.app import create_app
from student_server.settings import StudentSettings
from unite_cli.main import main

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


# `unite publish list`, `rollback` and `add`.


def test_list_versions_newest_first(exports, tmp_path):
    versions = [publish_student(export, tmp_path) for export in exports[:3]]

    listed = list_versions(tmp_path)

    assert [version.name for version in listed] == [version.name for version in reversed(versions)]
    assert [version.current for version in listed] == [True, False, False]
    for version, export in zip(listed, reversed(exports[:3])):
        sha256 = file_sha256(export / CHECKPOINT_WEIGHTS)
        assert version.sha256 == sha256
        assert version.student == f"timm:{SMALL_STUDENT}@{sha256[:12]}"
        assert version.teacher == "test-teacher/v1"
        assert version.problem == ""
        assert version.has_onnx is False
        assert version.size_bytes == sum(path.stat().st_size for path in export.rglob("*") if path.is_file())


def test_cli_list_marks_current(exports, tmp_path, capsys):
    versions = [publish_student(export, tmp_path) for export in exports[:2]]
    (versions[0] / CHECKPOINT_WEIGHTS).write_bytes(b"cut short")

    status = main(["publish", "list", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()

    assert status == 0
    assert lines[0] == f"publish root {tmp_path}: 2 versions, newest first; current: {versions[1].name}"
    assert lines[1].split() == ["VERSION", "STUDENT", "TEACHER", "ONNX", "SIZE", "STATUS"]
    newest, oldest = lines[2], lines[3]
    sha256 = file_sha256(exports[1] / CHECKPOINT_WEIGHTS)
    size_mb = f"{list_versions(tmp_path)[0].size_bytes / 1e6:.1f}"
    assert newest.split()[:7] == ["*", versions[1].name, f"timm:{SMALL_STUDENT}@{sha256[:12]}", "test-teacher/v1", "no", size_mb, "MB"]
    assert newest.endswith("complete")
    assert oldest.startswith(f"   {versions[0].name}")
    assert oldest.endswith(f"incomplete: {CHECKPOINT_WEIGHTS} does not have the sha256 that {CHECKPOINT_CONFIG} records")


def test_cli_list_without_versions_folder(tmp_path, caplog):
    status = main(["publish", "list", str(tmp_path)])

    assert status == 2
    assert f"publish root {tmp_path} has no versions/ folder" in caplog.text


def test_cli_list_of_file_names_publish_root(exports, tmp_path, caplog):
    version = publish_student(exports[0], tmp_path)
    weights = version / CHECKPOINT_WEIGHTS

    status = main(["publish", "list", str(weights)])

    assert status == 2
    assert f"ROOT {weights} is a file, expected a folder. Pass the publish root, the folder that contains versions/ and current." in caplog.text
    assert "Pass the folder that contains it" not in caplog.text


def test_rollback_to_previous_then_named(exports, tmp_path, capsys):
    versions = [publish_student(export, tmp_path) for export in exports[:3]]

    first = main(["publish", "rollback", str(tmp_path)])
    after_first = current_version(tmp_path)
    second = main(["publish", "rollback", str(tmp_path)])
    after_second = current_version(tmp_path)
    named = main(["publish", "rollback", str(tmp_path), "--to", versions[2].name])
    printed = capsys.readouterr().out.splitlines()

    assert (first, second, named) == (0, 0, 0)
    assert after_first == versions[1]
    assert after_second == versions[0]
    assert current_version(tmp_path) == versions[2]
    assert (tmp_path / CURRENT_LINK).is_symlink()
    assert printed[-1] == f"{tmp_path / CURRENT_LINK} -> {VERSIONS_DIR}/{versions[2].name}"
    assert published_versions(tmp_path) == sorted(version.name for version in versions)


def test_rollback_unknown_version_lists_available(exports, tmp_path, caplog):
    versions = [publish_student(export, tmp_path) for export in exports[:2]]

    status = main(["publish", "rollback", str(tmp_path), "--to", "20990101T000000000000Z-000000000000"])

    assert status == 2
    assert "no such version" in caplog.text
    assert f"{versions[1].name} (current)" in caplog.text
    assert versions[0].name in caplog.text
    assert current_version(tmp_path) == versions[1]


def test_rollback_to_incomplete_version_rejected(exports, tmp_path):
    versions = [publish_student(export, tmp_path) for export in exports[:3]]
    (versions[0] / CHECKPOINT_WEIGHTS).unlink()

    with pytest.raises(ConfigError, match=rf"the version is incomplete \({CHECKPOINT_WEIGHTS} is missing\)") as raised:
        rollback_current(tmp_path, versions[0].name)

    assert raised.value.limit == [versions[2].name, versions[1].name]
    assert current_version(tmp_path) == versions[2]


def test_rollback_skips_incomplete_previous(exports, tmp_path):
    versions = [publish_student(export, tmp_path) for export in exports[:3]]
    (versions[1] / CHECKPOINT_CONFIG).write_text("not json")

    assert rollback_current(tmp_path) == versions[0]


def test_rollback_without_older_version(exports, tmp_path):
    only = publish_student(exports[0], tmp_path)

    with pytest.raises(ConfigError, match=f"no complete version is older than the current {only.name}"):
        rollback_current(tmp_path)

    assert current_version(tmp_path) == only


def hidden_entries(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir() if path.name.startswith("."))


def relink_current(root: Path, target: str) -> None:
    (root / CURRENT_LINK).unlink()
    os.symlink(target, root / CURRENT_LINK)


def test_current_folder_rejected_before_changes(exports, tmp_path, caplog):
    root = tmp_path / "root"
    versions = [publish_student(export, root) for export in exports[:2]]
    current = root / CURRENT_LINK
    current.unlink()
    shutil.copytree(exports[1], current)

    added = main(["publish", "add", str(exports[2]), str(root)])
    rolled_back = main(["publish", "rollback", str(root), "--to", versions[0].name])

    assert (added, rolled_back) == (2, 2)
    assert caplog.text.count(f"{current} is a folder, expected a symbolic link to a folder under {root / VERSIONS_DIR}") == 2
    assert f"Move {current} out of the publish root" in caplog.text
    assert published_versions(root) == sorted(version.name for version in versions)
    assert current.is_dir()
    assert not current.is_symlink()
    assert hidden_entries(root) == []


def test_point_current_failure_removes_temporary_link(exports, tmp_path):
    version = publish_student(exports[0], tmp_path)
    (tmp_path / CURRENT_LINK).unlink()
    (tmp_path / CURRENT_LINK).mkdir()
    (tmp_path / CURRENT_LINK / "file").write_text("not empty")

    with pytest.raises(OSError):
        _point_current(tmp_path, version)

    assert hidden_entries(tmp_path) == []


def test_symlinked_version_invalid_and_rejected(exports, tmp_path, capsys):
    root = tmp_path / "root"
    versions = [publish_student(export, root) for export in exports[:2]]
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(versions[0], elsewhere)
    os.symlink(elsewhere, root / VERSIONS_DIR / "zz-linked")

    listed = list_versions(root)
    with pytest.raises(ConfigError, match=r"to zz-linked: the version is invalid \(a symbolic link to .*elsewhere, expected a folder directly under"):
        rollback_current(root, "zz-linked")
    status = main(["publish", "list", str(root)])
    printed = capsys.readouterr().out.splitlines()

    linked = next(version for version in listed if version.name == "zz-linked")
    assert linked.invalid is True
    assert linked.current is False
    assert [version.name for version in listed if not version.problem] == [versions[1].name, versions[0].name]
    assert current_version(root) == versions[1]
    assert rollback_current(root) == versions[0]
    assert status == 0
    assert printed[2].split()[:2] == ["zz-linked", "unknown"]
    assert f"invalid: a symbolic link to {elsewhere}" in printed[2]


@pytest.mark.parametrize("target", ["versions/20990101T000000000000Z-000000000000", "OUTSIDE", "../../x"])
def test_cli_list_warns_about_bad_current(target, exports, tmp_path, capsys):
    root = tmp_path / "root"
    version = publish_student(exports[0], root)
    if target == "OUTSIDE":
        target = str(shutil.copytree(exports[1], tmp_path / "outside"))
    relink_current(root, target)

    status = main(["publish", "list", str(root)])
    lines = capsys.readouterr().out.splitlines()

    assert status == 0
    assert lines[0].endswith(f"current: -> {target} (invalid)")
    assert lines[2].split()[0] == version.name
    assert lines[-1].startswith(f"WARNING: {root / CURRENT_LINK} points at {target}")
    assert f"unite publish rollback {root} --to VERSION" in lines[-1]
    assert current_version(root) is None


def test_cli_list_warns_about_current_folder(exports, tmp_path, capsys):
    publish_student(exports[0], tmp_path)
    (tmp_path / CURRENT_LINK).unlink()
    (tmp_path / CURRENT_LINK).mkdir()

    status = main(["publish", "list", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()

    assert status == 0
    assert lines[0].endswith("current: not a symbolic link (invalid)")
    assert lines[-1].startswith(f"WARNING: {tmp_path / CURRENT_LINK} is a folder, expected a symbolic link")
    assert f"Move {tmp_path / CURRENT_LINK} out of the publish root" in lines[-1]


def test_publish_replaces_current_outside_root(exports, tmp_path):
    root = tmp_path / "root"
    publish_student(exports[1], root)
    outside = shutil.copytree(exports[0], tmp_path / "outside")
    relink_current(root, str(outside))

    version = publish_student(exports[0], root)

    assert version.parent == root / VERSIONS_DIR
    assert current_version(root) == version
    assert os.readlink(root / CURRENT_LINK) == f"{VERSIONS_DIR}/{version.name}"


def test_cli_add_publishes_export(exports, tmp_path, capsys):
    root = tmp_path / "root"

    added = main(["publish", "add", str(exports[0]), str(root)])
    again = main(["publish", "add", str(exports[0]), str(root)])
    printed = capsys.readouterr().out.splitlines()

    version = current_version(root)
    assert (added, again) == (0, 0)
    assert printed[0] == f"{root / CURRENT_LINK} -> {VERSIONS_DIR}/{version.name} (published)"
    assert printed[1] == f"{root / CURRENT_LINK} -> {VERSIONS_DIR}/{version.name} (already current, nothing copied)"
    assert file_sha256(version / CHECKPOINT_WEIGHTS) == file_sha256(exports[0] / CHECKPOINT_WEIGHTS)


def test_cli_add_missing_export(tmp_path, caplog):
    status = main(["publish", "add", str(tmp_path / "no-export"), str(tmp_path / "root")])

    assert status == 2
    assert f"EXPORT_DIR {tmp_path / 'no-export'} not found" in caplog.text


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory) -> tuple[Path, Path]:
    """Two one-block UNITE students. test_vit is not used here, because torch cannot export its antialiased bicubic resize to ONNX."""
    folder = tmp_path_factory.mktemp("tiny")
    return save_tiny_student(folder / "first", seed=1), save_tiny_student(folder / "second", seed=2)


@pytest.fixture(scope="module")
def onnx_export(tiny_exports, tmp_path_factory) -> Path:
    """A copy of the first tiny export with model.onnx beside its weights, as `unite export-onnx` writes it."""
    from distiller.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("onnx") / "student"
    shutil.copytree(tiny_exports[0], folder)
    export_onnx(folder, folder / ONNX_WEIGHTS)
    return folder


def test_cli_add_export_with_onnx(onnx_export, tmp_path, capsys):
    status = main(["publish", "add", str(onnx_export), str(tmp_path)])
    capsys.readouterr()
    listed = main(["publish", "list", str(tmp_path)])
    row = capsys.readouterr().out.splitlines()[2]

    version = current_version(tmp_path)
    assert (status, listed) == (0, 0)
    assert (version / ONNX_WEIGHTS).read_bytes() == (onnx_export / ONNX_WEIGHTS).read_bytes()
    assert row.split()[4] == "yes"
    assert list_versions(tmp_path)[0].has_onnx is True


def test_cli_add_rejects_onnx_of_other_weights(onnx_export, tiny_exports, tmp_path, caplog):
    stale = tmp_path / "stale"
    shutil.copytree(tiny_exports[1], stale)
    shutil.copyfile(onnx_export / ONNX_WEIGHTS, stale / ONNX_WEIGHTS)

    status = main(["publish", "add", str(stale), str(tmp_path / "root")])

    assert status == 2
    assert f"cannot publish {stale}: its {ONNX_WEIGHTS} does not load with the onnx runtime" in caplog.text
    assert "was exported from weights with sha256" in caplog.text
    assert not (tmp_path / "root" / CURRENT_LINK).exists()


def test_rollback_reloads_running_student_server(tiny_exports, shared_data, tmp_path):
    first, second = tiny_exports
    tiles = lung_tiles(shared_data, 2)
    old_sha, old_embeddings = direct_embeddings(first, tiles)
    new_sha, _ = direct_embeddings(second, tiles)
    root = tmp_path / "published"
    publish_student(first, root)
    publish_student(second, root)
    settings = StudentSettings(checkpoint_dir=root, jobs_dir=tmp_path / "jobs", upload_dir=tmp_path / "uploads", reload_interval_s=0.2)

    with run_app(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        before = post_embeddings(client, tiles)
        status = main(["publish", "rollback", str(root)])
        wait_for(lambda: client.get("/readyz").json().get("checkpoint_sha256") == old_sha, what="the rolled-back student served")
        after = post_embeddings(client, tiles)

    assert before.json()["checkpoint_sha256"] == new_sha
    assert status == 0
    assert after.status_code == 200, after.text
    assert after.json()["checkpoint_sha256"] == old_sha
    np.testing.assert_allclose(response_embeddings(after), old_embeddings, atol=0.05)
