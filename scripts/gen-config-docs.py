#!/usr/bin/env python3
"""Write docs/configuration.md, the reference of every environment variable, from the services' settings classes.

Each service's pydantic-settings class (``GatewaySettings``, ``StudentSettings``) gives one table of
variable, type, default and description, the description taken from the field's ``Field(description=...)``.
A field whose type is a pydantic model (the gateway's ``remote`` and its ``adapter``) gets a row for the
whole object as JSON and one row per nested field, joined by the class's ``env_nested_delimiter``.

    python scripts/gen-config-docs.py            # rewrite docs/configuration.md
    python scripts/gen-config-docs.py --check    # exit 1 when docs/configuration.md is out of date

tests/test_config_docs.py fails when the file differs from what this script writes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from student_server.settings import StudentSettings  # noqa: E402
from teacher_gateway.client import API_KEY_ENV  # noqa: E402
from teacher_gateway.settings import GatewaySettings  # noqa: E402

OUTPUT = REPO / "docs" / "configuration.md"
GENERATOR = "scripts/gen-config-docs.py"
TEMP_DIR_PLACEHOLDER = "$TMPDIR"
BYTE_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


@dataclass(frozen=True)
class Service:
    """One service's settings class, with the heading and the introduction of its section."""

    title: str
    settings_class: type[BaseSettings]
    introduction: str


SERVICES = (
    Service(
        title="Teacher gateway",
        settings_class=GatewaySettings,
        introduction=(
            "Read by `unite serve-gateway`; its command-line options override some of them "
            "(`unite serve-gateway --help`). docs/gateway.md explains budgets, keys and the canary check, "
            "docs/remote-teachers.md the remote teacher and docs/local-teachers.md the local ones. For example, "
            "`UNITE_GATEWAY_REMOTE__ADAPTER='{\"index_path\": null}'` takes a provider's vectors in input order."
        ),
    ),
    Service(
        title="Student server",
        settings_class=StudentSettings,
        introduction=(
            "Read by `unite serve-student`; `--host`, `--port`, `--checkpoint` and `--runtime` override the matching "
            "variables. docs/student-server.md explains the tile rules, slide jobs and housekeeping."
        ),
    ),
)

# Variables that no settings class reads, as (variable cell, default, description).
OTHER_VARIABLES = (
    (
        "the variable that `UNITE_GATEWAY_REMOTE__API_KEY_ENV` names",
        "unset",
        "API key of the remote teacher, read once when the gateway starts and sent only in the auth header. "
        "Keep it out of the repository, and out of files that are committed.",
    ),
    (
        f"`{API_KEY_ENV}`",
        "unset",
        "API key that `unite teach` and `GatewayClient` send to a gateway with a keys file, as "
        "`Authorization: Bearer`; never logged.",
    ),
    (
        "`UNITE_DATA_DIR`",
        "`~/.cache/unite/data`",
        "Folder where `unite fetch-sample` and the demo store the sample slide. docker-compose.yml uses the same "
        "name for the host folder of slides that it mounts at /data.",
    ),
)


@dataclass(frozen=True)
class Row:
    variable: str
    type: str
    default: str
    description: str


def describe_type(annotation: Any) -> str:
    """Describe a field's annotation in words an operator writes as an environment value."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        others = [argument for argument in arguments if argument is not type(None)]
        described = " or ".join(describe_type(argument) for argument in others)
        return f"{described}, optional" if len(others) < len(arguments) else described
    if origin is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in arguments)
    if origin is tuple:
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return f"JSON list of {describe_type(arguments[0])}s"
        kinds = {describe_type(argument) for argument in arguments}
        kind = kinds.pop() if len(kinds) == 1 else "values"
        return f"JSON list of {len(arguments)} {kind}s"
    if origin in (list, set, frozenset):
        return "JSON list"
    if origin is dict or annotation is dict:
        return "JSON object"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "JSON object"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))


def describe_default(name: str, field: FieldInfo) -> str:
    """Describe a field's default; a default_factory is called, and a path under the temporary folder is shown as $TMPDIR."""
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, Path):
        return f"`{show_temp_dir(value)}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (dict, list, tuple)):
        return f"`{value!r}`" if value else "empty"
    text = f"`{value}`"
    if isinstance(value, int) and name.endswith("_bytes"):
        text += human_bytes(value)
    return text


def show_temp_dir(path: Path) -> str:
    """Write ``path`` with this machine's temporary folder as $TMPDIR, so the reference does not depend on the machine."""
    temp_dir = Path(tempfile.gettempdir())
    try:
        return f"{TEMP_DIR_PLACEHOLDER}/{path.relative_to(temp_dir).as_posix()}"
    except ValueError:
        return path.as_posix()


def human_bytes(count: int) -> str:
    for unit, size in BYTE_UNITS:
        if count >= size and count % size == 0:
            return f" ({count // size} {unit})"
    return ""


def model_class_of(annotation: Any) -> type[BaseModel] | None:
    """Return the pydantic model in ``annotation`` (``Model`` or ``Model | None``), or None when it has none."""
    candidates = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def table_cell(text: str) -> str:
    """Make ``text`` safe inside one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def settings_rows(model: type[BaseModel], prefix: str, delimiter: str | None) -> list[Row]:
    """List one row per field of ``model``, and for a nested model one row for it as JSON and one per nested field."""
    rows = []
    for name, field in model.model_fields.items():
        variable = f"{prefix}{name}".upper()
        nested = model_class_of(field.annotation)
        rows.append(
            Row(
                variable=variable,
                type=describe_type(field.annotation),
                default=describe_default(name, field),
                description=field.description or "",
            )
        )
        if nested is not None and delimiter:
            rows.extend(settings_rows(nested, f"{variable}{delimiter}", delimiter))
    return rows


def service_section(service: Service) -> str:
    config = service.settings_class.model_config
    prefix = config.get("env_prefix", "")
    delimiter = config.get("env_nested_delimiter")
    lines = [
        f"## {service.title}",
        "",
        f"Class `{service.settings_class.__module__}.{service.settings_class.__name__}`, prefix `{prefix}`. {service.introduction}",
    ]
    if delimiter:
        lines += [
            "",
            f"A nested setting is either one JSON object in its own variable or one variable per field, joined by "
            f"`{delimiter}`. A nested field marked required must be set whenever its parent is set. A per-field "
            "variable is read as text, so `null` there is not None: to set an optional nested field to None, "
            "write its parent as one JSON object.",
        ]
    lines += ["", "| variable | type | default | description |", "|---|---|---|---|"]
    for row in settings_rows(service.settings_class, prefix, delimiter):
        cells = (f"`{row.variable}`", row.type, row.default, row.description)
        lines.append("| " + " | ".join(table_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def render() -> str:
    """Return the text of docs/configuration.md."""
    sections = [
        "# Configuration reference",
        "",
        f"<!-- Generated by {GENERATOR} from the settings classes. Edit the Field descriptions and rerun it; "
        "tests/test_config_docs.py fails when this file is out of date. -->",
        "",
        "Every setting of the two services is an environment variable. A variable that is unset takes the "
        "default in its table. An invalid value stops the service at start with an error that names the "
        "variable. Variable names are matched without regard to case. Values of JSON types are written as JSON, "
        "for example `UNITE_GATEWAY_MEAN='[0.485, 0.456, 0.406]'`. "
        f"`{TEMP_DIR_PLACEHOLDER}` stands for Python's temporary folder (`tempfile.gettempdir()`, usually `/tmp`).",
        "",
        "docker-compose.yml reads its own variables (image tag, host ports and folders, distiller schedule); "
        "`.env.example` lists them with their defaults.",
    ]
    for service in SERVICES:
        sections += ["", service_section(service)]
    sections += ["", "## Other variables", "", "| variable | default | description |", "|---|---|---|"]
    for variable, default, description in OTHER_VARIABLES:
        sections.append(f"| {table_cell(variable)} | {table_cell(default)} | {table_cell(description)} |")
    return "\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is out of date")
    parser.add_argument("--out", type=Path, default=OUTPUT, help=f"file to write (default: {OUTPUT.relative_to(REPO)})")
    arguments = parser.parse_args(argv)

    text = render()
    if arguments.check:
        current = arguments.out.read_text(encoding="utf-8") if arguments.out.exists() else None
        if current != text:
            print(f"{arguments.out} is out of date with the settings classes; run python {GENERATOR}", file=sys.stderr)
            return 1
        return 0
    arguments.out.write_text(text, encoding="utf-8")
    print(f"wrote {arguments.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
