"""docs/configuration.md against the settings classes it is generated from (scripts/gen-config-docs.py)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gen-config-docs.py"
DOC = REPO / "docs" / "configuration.md"
# Folders that hold no service code: the tests, and virtual environments inside the checkout.
SKIPPED_FOLDERS = {"tests", ".venv", "venv", "build", "runs"}


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Registered first, because the script's dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def settings_classes_in_source() -> set[str]:
    """Find every class in the project's source that subclasses BaseSettings, as ``module.Class``."""
    found = set()
    for path in REPO.rglob("*.py"):
        relative = path.relative_to(REPO)
        if SKIPPED_FOLDERS.intersection(relative.parts[:-1]):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {base.id if isinstance(base, ast.Name) else getattr(base, "attr", None) for base in node.bases}
            if "BaseSettings" in bases:
                module = ".".join(relative.with_suffix("").parts)
                found.add(f"{module}.{node.name}")
    return found


def test_configuration_doc_up_to_date(generator):
    expected = generator.render()
    current = DOC.read_text(encoding="utf-8")
    assert current == expected, "docs/configuration.md is out of date with the settings classes; run python scripts/gen-config-docs.py"


def test_generator_documents_every_settings_class(generator):
    documented = {f"{service.settings_class.__module__}.{service.settings_class.__name__}" for service in generator.SERVICES}
    assert settings_classes_in_source() == documented


def test_every_field_has_description_and_row(generator):
    text = DOC.read_text(encoding="utf-8")
    for service in generator.SERVICES:
        config = service.settings_class.model_config
        rows = generator.settings_rows(service.settings_class, config["env_prefix"], config.get("env_nested_delimiter"))
        for row in rows:
            assert row.description, f"{row.variable} has no Field description"
            assert f"| `{row.variable}` |" in text
        for name in service.settings_class.model_fields:
            assert f"`{config['env_prefix']}{name}`".upper() in text.upper()


def test_nested_fields_get_own_variables(generator):
    rows = {row.variable: row for row in generator.settings_rows(generator.GatewaySettings, "UNITE_GATEWAY_", "__")}
    assert rows["UNITE_GATEWAY_REMOTE"].type == "JSON object, optional"
    assert rows["UNITE_GATEWAY_REMOTE__URL"].default == "required"
    assert rows["UNITE_GATEWAY_REMOTE__ADAPTER__EMBEDDINGS_PATH"].default == "`data[*].embedding`"
    assert rows["UNITE_GATEWAY_API_DOCS"].type == "one of `open`, `key`, `off`"
    assert rows["UNITE_GATEWAY_MEAN"].type == "JSON list of 3 numbers, optional"


def test_documented_variables_are_read(generator, monkeypatch):
    """Variables named as the doc names them set the fields, nested ones included."""
    monkeypatch.setenv("UNITE_GATEWAY_PORT", "9123")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__URL", "https://embeddings.example.org/v1/embeddings")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__MODEL", "vendor-model")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__DIM", "16")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__LICENCE", "test")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__ADAPTER__EMBEDDINGS_PATH", "output.predictions[*].vector")
    monkeypatch.setenv("UNITE_GATEWAY_MEAN", "[0.485, 0.456, 0.406]")
    settings = generator.GatewaySettings()
    assert settings.port == 9123
    assert settings.remote.dim == 16
    assert settings.remote.adapter.embeddings_path == "output.predictions[*].vector"
    assert settings.mean == (0.485, 0.456, 0.406)


def test_temp_dir_defaults_machine_independent(generator, monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert generator.render() == DOC.read_text(encoding="utf-8")


def test_check_flag_reports_stale_file(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text("# old\n", encoding="utf-8")
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--out", str(stale)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 1
    assert "out of date" in completed.stderr

    written = subprocess.run([sys.executable, str(SCRIPT), "--out", str(stale)], capture_output=True, text=True, timeout=120)
    assert written.returncode == 0, written.stderr
    assert stale.read_text(encoding="utf-8") == DOC.read_text(encoding="utf-8")
