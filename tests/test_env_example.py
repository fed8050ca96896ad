""".env.example against the variables that docker-compose.yml reads, and .env in .gitignore.

The variables of docker-compose.yml are found by parsing its YAML, and, when the Docker Compose binary
that scripts/get-compose.sh caches is present, also by ``docker-compose config --variables``. This
module never downloads the binary.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
SECRETS_SECTION = "Secrets"
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error} and the other forms, or a bare $NAME; $$ is a literal $.
_VARIABLE = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<operator>:?[-?+])?(?P<argument>[^}]*)\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")
_SECTION = re.compile(r"^# == (?P<name>.+) ==$")
_ASSIGNMENT = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)$")


@dataclass
class ExampleVariable:
    name: str
    value: str
    section: str
    comment: list[str]


def strings_in(document) -> list[str]:
    """Collect every string in a parsed YAML document, keys included."""
    if isinstance(document, str):
        return [document]
    if isinstance(document, dict):
        return [text for key, value in document.items() for text in strings_in(key) + strings_in(value)]
    if isinstance(document, list):
        return [text for item in document for text in strings_in(item)]
    return []


def compose_variables() -> dict[str, str | None]:
    """Return each variable that docker-compose.yml interpolates, with its ``:-`` or ``-`` default (None without one)."""
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    variables: dict[str, str | None] = {}
    for text in strings_in(document):
        for match in _VARIABLE.finditer(text):
            name = match["braced"] or match["bare"]
            if name is None:
                continue
            default = match["argument"] if match["operator"] in (":-", "-") else None
            variables.setdefault(name, default)
    return variables


def example_variables() -> list[ExampleVariable]:
    """Parse .env.example into its assignments, each with its section and the comment lines above it."""
    variables = []
    section = ""
    comment: list[str] = []
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        heading = _SECTION.match(line)
        if heading:
            section, comment = heading["name"], []
        elif line.startswith("#"):
            comment.append(line.lstrip("# "))
        elif not line.strip():
            comment = [] if section != SECRETS_SECTION else comment
        else:
            assignment = _ASSIGNMENT.match(line)
            assert assignment, f".env.example line {line!r} is not NAME=value"
            variables.append(ExampleVariable(assignment["name"], assignment["value"], section, comment))
            comment = []
    return variables


def cached_compose_binary() -> Path | None:
    tools = Path(os.environ.get("UNITE_TOOLS_DIR", Path.home() / ".cache" / "unite" / "tools"))
    binaries = sorted(tools.glob("docker-compose-v*"))
    return binaries[-1] if binaries and os.access(binaries[-1], os.X_OK) else None


def test_compose_parser_finds_defaults():
    variables = compose_variables()
    assert variables["UNITE_IMAGE_TAG"] == "local"
    assert variables["UNITE_BASE_IMAGE"] == "python:3.11-slim-bookworm"
    assert "UNITE_DATA_DIR" in variables


def test_example_lists_every_compose_variable():
    listed = {variable.name for variable in example_variables()}
    missing = sorted(set(compose_variables()) - listed)
    assert not missing, f"docker-compose.yml reads {missing}, which .env.example does not list"


def test_example_has_no_unused_variable():
    used = set(compose_variables())
    unused = sorted(
        variable.name for variable in example_variables() if variable.section != SECRETS_SECTION and variable.name not in used
    )
    assert not unused, f".env.example lists {unused}, which docker-compose.yml does not read"


def test_example_defaults_match_compose():
    defaults = compose_variables()
    for variable in example_variables():
        if variable.name in defaults and defaults[variable.name] is not None:
            assert variable.value == defaults[variable.name], variable.name


def test_example_variables_have_comments_and_sections():
    variables = example_variables()
    names = [variable.name for variable in variables]
    assert len(names) == len(set(names)), "a variable is listed twice"
    for variable in variables:
        assert variable.section, f"{variable.name} is outside a '# == Section ==' heading"
        assert variable.comment, f"{variable.name} has no comment line above it"


def test_secrets_are_empty_placeholders():
    secrets = [variable for variable in example_variables() if variable.section == SECRETS_SECTION]
    assert secrets, ".env.example has no secrets section"
    for secret in secrets:
        assert secret.value == "", f"{secret.name} has a value in .env.example"
        assert any("never commit" in line for line in secret.comment), f"{secret.name} lacks the never-commit warning"


def test_secret_says_how_gateway_reads_it():
    for secret in (variable for variable in example_variables() if variable.section == SECRETS_SECTION):
        comment = " ".join(secret.comment)
        assert "UNITE_GATEWAY_REMOTE__API_KEY_ENV" in comment, f"{secret.name} does not say which setting names it"
        assert secret.name in comment, f"{secret.name}'s comment does not give the value for UNITE_GATEWAY_REMOTE__API_KEY_ENV"


def test_dotenv_ignored_by_git():
    patterns = [line.strip() for line in (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()]
    assert ".env" in patterns or "/.env" in patterns
    assert ".env.example" not in patterns, ".env.example is the committed template and must not be ignored"


def test_real_compose_agrees(tmp_path):
    binary = cached_compose_binary()
    if binary is None:
        pytest.skip("no cached Docker Compose binary; scripts/get-compose.sh downloads it")
    environment = {name: value for name, value in os.environ.items() if not name.startswith(("UNITE_", "COMPOSE_", "DOCKER_"))}
    environment["DOCKER_CONFIG"] = str(tmp_path / "docker-config")
    base = [str(binary), "--file", str(COMPOSE_FILE), "--project-directory", str(REPO)]

    listed = subprocess.run([*base, "config", "--variables", "--format", "json"], capture_output=True, text=True, timeout=120, env=environment)
    assert listed.returncode == 0, listed.stderr
    reported = {name: entry["DefaultValue"] for name, entry in json.loads(listed.stdout).items()}
    assert reported == compose_variables()

    # The project folder may hold a developer's own .env, so both runs name their env file explicitly.
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("", encoding="utf-8")
    with_defaults = subprocess.run([*base, "--env-file", str(empty_env), "config"], capture_output=True, text=True, timeout=120, env=environment)
    with_example = subprocess.run([*base, "--env-file", str(ENV_EXAMPLE), "config"], capture_output=True, text=True, timeout=120, env=environment)
    assert with_defaults.returncode == 0, with_defaults.stderr
    assert with_example.returncode == 0, with_example.stderr
    assert with_example.stdout == with_defaults.stdout
