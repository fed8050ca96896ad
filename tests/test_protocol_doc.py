"""docs/protocol.md against the protocol models and the error codes the services define."""

from __future__ import annotations

import json
import re
from pathlib import Path

from shared.protocol import EmbeddingRequest, EmbeddingResponse, ErrorResponse

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "protocol.md"
SOURCE_FOLDERS = ("shared", "teacher_gateway", "student_server")
# Codes that shared/http.py writes as literals rather than as an exception class's ``code``.
HTTP_LAYER_CODES = {"not_found", "method_not_allowed", "http_error", "internal_error"}
# Base classes whose code never reaches a client: each raised error is a subclass with its own code,
# and a configuration error stops the service before it serves.
UNSENT_CODES = {"unite_error", "gateway_limit", "invalid_config"}


def json_blocks() -> list[dict]:
    text = DOC.read_text(encoding="utf-8")
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, flags=re.DOTALL)]


def documented_codes() -> set[str]:
    codes = set()
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and (cells[0].isdigit() or cells[0] in ("other", "none")):
            codes.update(re.findall(r"`([a-z_]+)`", cells[1]))
    return codes


def defined_codes() -> set[str]:
    codes = set()
    for folder in SOURCE_FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            codes.update(re.findall(r'^\s+code = "([a-z_]+)"', path.read_text(encoding="utf-8"), flags=re.MULTILINE))
    return codes


def test_examples_match_models():
    request, response, error = json_blocks()
    parsed_request = EmbeddingRequest.model_validate(request)
    assert parsed_request.input[0].coords == (10752, 4480)
    parsed_response = EmbeddingResponse.model_validate(response)
    assert [row.index for row in parsed_response.data] == list(range(len(request["input"])))
    assert parsed_response.usage.tiles == len(request["input"])
    parsed_error = ErrorResponse.model_validate(error)
    assert parsed_error.error.code == "request_too_large"


def test_error_table_lists_every_code():
    expected = (defined_codes() | HTTP_LAYER_CODES) - UNSENT_CODES
    assert documented_codes() == expected


def test_http_layer_codes_still_used():
    http_source = (REPO / "shared" / "http.py").read_text(encoding="utf-8")
    for code in HTTP_LAYER_CODES:
        assert f'"{code}"' in http_source, code
