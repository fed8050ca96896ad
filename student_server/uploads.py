"""Where a submitted slide comes from: a ``multipart/form-data`` upload streamed to disk, or a path under the data root.

Starlette's own form parsing (1.10) reads the whole body before a handler runs and has no limit on file
parts, so this module feeds the raw request stream to python-multipart's push parser instead. The file
part goes straight to a file under the upload folder in the chunks the client sends. The whole slide is
never in memory, and the upload stops as soon as it passes the limit. The original file name is
used only for its extension (some openslide formats are recognised by it) and is never stored or logged.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import anyio
from starlette.requests import ClientDisconnect, Request

from shared.errors import SlideError
from shared.http import shorten_echoed
from student_server.errors import InvalidRequestError, SlidePathForbiddenError, UploadTooLargeError

try:
    from python_multipart.exceptions import FormParserError, ParseError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # python-multipart before 0.0.13 installs the package as `multipart`
    from multipart.exceptions import FormParserError, ParseError
    from multipart.multipart import MultipartParser, parse_options_header

FILE_FIELD = "file"
# Bytes a multipart body may carry beyond the file itself: boundaries, part headers and the small fields.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_FIELD_BYTES = 1024
MAX_PARTS = 16
_SUFFIX_PATTERN = re.compile(r"^\.[a-z0-9]{1,10}$")


@dataclass
class SlideUpload:
    """A slide file written to the upload folder, with its size in bytes and the other form fields."""

    path: Path
    size: int
    fields: dict[str, str] = field(default_factory=dict)


async def receive_slide_upload(request: Request, *, upload_dir: Path, max_bytes: int) -> SlideUpload:
    """Stream the ``file`` part of a multipart request to a new file in ``upload_dir`` and return it.

    Other parts are returned as text fields of at most 1 KiB each. Raises :class:`UploadTooLargeError`
    (413) when the file part passes ``max_bytes``, or when the declared ``Content-Length`` or the body
    received passes ``max_bytes`` plus 64 KiB of multipart overhead. Raises :class:`InvalidRequestError`
    (422) for a body that is not multipart, is malformed, ends early or has no ``file`` part. The
    partial file is deleted whenever an error is raised, and the caller deletes the returned file.
    """
    boundary = _multipart_boundary(request.headers.get("content-type"))
    _check_declared_length(request.headers.get("content-length"), max_bytes)

    # Uploads may be patient data, so the folder and the files are readable by the server's user only.
    upload_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    receiver = _MultipartReceiver(upload_dir, max_bytes)
    parser = new_multipart_parser(boundary, receiver.callbacks())
    try:
        async for chunk in request.stream():
            receiver.count_body_bytes(len(chunk))
            # The parser's callbacks write to disk, so the parsing runs off the event loop.
            await anyio.to_thread.run_sync(parser.write, chunk)
        parser.finalize()
        return receiver.result()
    except ClientDisconnect as error:
        receiver.discard()
        raise InvalidRequestError(
            f"the client disconnected after {receiver.body_bytes} bytes, before the upload was complete. Send the file again."
        ) from error
    except ParseError as error:
        receiver.discard()
        raise InvalidRequestError(
            f"the request body is not valid multipart/form-data ({type(error).__name__}). "
            f"Send the slide as a multipart form with the file in the field {FILE_FIELD!r}."
        ) from error
    except BaseException:
        receiver.discard()
        raise


def new_multipart_parser(boundary: bytes, callbacks: dict) -> MultipartParser:
    """Return python-multipart's push parser for ``boundary``, raising :class:`InvalidRequestError` (422) when it rejects the boundary.

    python-multipart 0.0.18 and later reject a boundary of more than 256 bytes when the parser is made.
    """
    try:
        return MultipartParser(boundary, callbacks)
    except FormParserError as error:
        raise InvalidRequestError(
            f"the multipart boundary in the Content-Type header is invalid ({error}). "
            "Use a boundary of 1 to 70 characters, as RFC 2046 requires.",
            value=len(boundary),
            limit=70,
        ) from error


def _multipart_boundary(content_type: str | None) -> bytes:
    media_type, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise InvalidRequestError(
            f"Content-Type is {content_type!r}, expected multipart/form-data with a boundary. "
            f"Send the slide as a multipart form with the file in the field {FILE_FIELD!r} "
            f"(for example curl -F {FILE_FIELD}=@slide.svs).",
            value=content_type,
            limit="multipart/form-data",
        )
    return boundary


def _check_declared_length(content_length: str | None, max_bytes: int) -> None:
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError as error:
        raise InvalidRequestError(f"Content-Length is {content_length!r}, expected a number of bytes.", value=content_length) from error
    if declared > max_bytes + MULTIPART_OVERHEAD_BYTES:
        raise UploadTooLargeError(
            f"the upload is {declared} bytes, more than the limit of {max_bytes} bytes per slide. "
            "Send a smaller slide, or raise UNITE_STUDENT_MAX_UPLOAD_BYTES on the server.",
            limit=max_bytes,
            value=declared,
        )


class FormPartHeaders:
    """Header callbacks of python-multipart's push parser, shared by the slide and the tile receivers.

    A subclass calls :meth:`start_part` from its ``on_part_begin`` callback, registers the three
    ``on_header_*`` methods, and reads the part's field name with :meth:`form_part_name` once the
    headers are finished.
    """

    def __init__(self) -> None:
        self._headers: dict[str, str] = {}
        self._header_name = bytearray()
        self._header_value = bytearray()

    def start_part(self) -> None:
        """Forget the headers of the previous part."""
        self._headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        name = self._header_name.decode("latin-1").strip().lower()
        self._headers[name] = self._header_value.decode("latin-1")
        self._header_name.clear()
        self._header_value.clear()

    def form_part_name(self) -> tuple[str, dict[bytes, bytes]]:
        """Return the current part's form field name and its Content-Disposition options.

        Raises :class:`InvalidRequestError` (422) when the part has no ``form-data`` disposition with a name.
        """
        disposition, options = parse_options_header(self._headers.get("content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", errors="replace")
        if disposition != b"form-data" or not name:
            raise InvalidRequestError("a form part has no Content-Disposition form-data header with a name.")
        return name, options


class _MultipartReceiver(FormPartHeaders):
    """Callbacks of the multipart parser: the file part goes to disk, the other parts into ``fields``."""

    def __init__(self, upload_dir: Path, max_bytes: int) -> None:
        super().__init__()
        self.upload_dir = upload_dir
        self.max_bytes = max_bytes
        self.body_bytes = 0
        self.parts = 0
        self.fields: dict[str, str] = {}
        self.finished = False

        self.path: Path | None = None
        self.size = 0
        self._file: BinaryIO | None = None
        self._file_done = False

        self._field_name: str | None = None
        self._field_value = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }

    def count_body_bytes(self, count: int) -> None:
        self.body_bytes += count
        if self.body_bytes > self.max_bytes + MULTIPART_OVERHEAD_BYTES:
            raise self._too_large(self.body_bytes)

    def result(self) -> SlideUpload:
        if not self.finished:
            raise InvalidRequestError(
                f"the multipart body ended after {self.body_bytes} bytes without its closing boundary. Send the file again."
            )
        if self.path is None or not self._file_done:
            raise InvalidRequestError(
                f"the form has no {FILE_FIELD!r} part. Send the slide file in the form field {FILE_FIELD!r} "
                f"(for example curl -F {FILE_FIELD}=@slide.svs).",
                value=sorted(self.fields),
            )
        return SlideUpload(path=self.path, size=self.size, fields=dict(self.fields))

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _too_large(self, value: int) -> UploadTooLargeError:
        return UploadTooLargeError(
            f"the upload passed the limit of {self.max_bytes} bytes per slide ({value} bytes received so far). "
            "Send a smaller slide, or raise UNITE_STUDENT_MAX_UPLOAD_BYTES on the server.",
            limit=self.max_bytes,
            value=value,
        )

    def _on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidRequestError(
                f"the form has more than {MAX_PARTS} parts. Send the file and at most the fields 'mpp', 'pooling' and 'include_patches'.",
                limit=MAX_PARTS,
                value=self.parts,
            )
        self.start_part()

    def _on_headers_finished(self) -> None:
        name, options = self.form_part_name()
        if name != FILE_FIELD:
            if name in self.fields:
                raise InvalidRequestError(f"the form field {name!r} occurs twice.", value=name)
            self._field_name = name
            self._field_value.clear()
            return
        if self.path is not None:
            raise InvalidRequestError(f"the form has more than one {FILE_FIELD!r} part. Send one slide per request.")
        self._field_name = None
        filename = options.get(b"filename", b"").decode("utf-8", errors="replace")
        self.path = self.upload_dir / f"upload-{uuid.uuid4().hex}{_safe_suffix(filename)}"
        self._file = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self.size += end - start
            if self.size > self.max_bytes:
                raise self._too_large(self.size)
            chunk = data[start:end]
            self._file.write(chunk)
            return
        self._field_value += data[start:end]
        if len(self._field_value) > MAX_FIELD_BYTES:
            raise InvalidRequestError(
                f"the form field {self._field_name!r} is longer than {MAX_FIELD_BYTES} bytes.",
                limit=MAX_FIELD_BYTES,
                value=len(self._field_value),
            )

    def _on_part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._file_done = True
        elif self._field_name is not None:
            self.fields[self._field_name] = self._field_value.decode("utf-8", errors="replace")
            self._field_name = None

    def _on_end(self) -> None:
        self.finished = True


def _safe_suffix(filename: str) -> str:
    # Only the extension survives: openslide recognises some formats by it, and the name may identify a patient.
    suffix = Path(filename.replace("\\", "/")).suffix.lower()
    return suffix if _SUFFIX_PATTERN.match(suffix) else ""


def resolve_data_path(requested: str, data_root: Path | None) -> Path:
    """Return the slide file that ``requested`` names under ``data_root``, with symlinks and ``..`` resolved.

    A relative ``requested`` is taken from ``data_root``. Raises :class:`SlidePathForbiddenError` (403)
    when ``data_root`` is unset or the resolved path lies outside it. That error is the same whether or
    not the file exists, so a client learns nothing about files outside the data root. Raises
    :class:`SlideError` (422, reason ``not_found``) for a path inside it that is not a regular file, and
    :class:`InvalidRequestError` (422) for one the file system cannot look up (a symlink loop, a name
    too long). Messages name ``requested`` as the client sent it, shortened, never the server's data root.
    """
    if data_root is None:
        raise SlidePathForbiddenError(
            "slides cannot be submitted by path because UNITE_STUDENT_DATA_ROOT is not set on the server. "
            f"Upload the slide as multipart/form-data in the field {FILE_FIELD!r}, or set UNITE_STUDENT_DATA_ROOT "
            "to the folder whose slides may be read.",
            limit="UNITE_STUDENT_DATA_ROOT",
            value=requested,
        )
    if not requested.strip() or "\x00" in requested:
        raise InvalidRequestError(
            f"path {requested!r} is not a file path. Send the slide's path relative to the data root (UNITE_STUDENT_DATA_ROOT).",
            value=requested,
        )

    root = data_root.resolve()
    candidate = Path(requested)
    joined = candidate if candidate.is_absolute() else root / candidate
    try:
        resolved = joined.resolve()
    except (OSError, RuntimeError) as error:
        # Python 3.11 raises RuntimeError for a symlink loop, and 3.13 raises OSError ELOOP.
        resolved = None
        problem = error
    else:
        problem = None
    if resolved is None or not resolved.is_relative_to(root):
        # The lexical check keeps a broken path outside the data root forbidden rather than described.
        if resolved is not None or not Path(os.path.normpath(joined)).is_relative_to(root):
            raise SlidePathForbiddenError(
                f"path {shorten_echoed(requested)!r} resolves outside the data root (setting UNITE_STUDENT_DATA_ROOT). "
                "Send a path inside that folder, with no '..' or symlink leading out of it.",
                limit="UNITE_STUDENT_DATA_ROOT",
                value=shorten_echoed(requested),
            )
        raise _unusable_path(requested, problem) from problem
    try:
        is_file = resolved.is_file()
    except OSError as error:
        raise _unusable_path(requested, error) from error
    if not is_file:
        raise SlideError(
            f"path {shorten_echoed(requested)!r} does not exist under the data root or is not a file. Send the path of a slide "
            "file relative to the data root (UNITE_STUDENT_DATA_ROOT).",
            reason="not_found",
            value=shorten_echoed(requested),
        )
    return resolved


def _unusable_path(requested: str, error: BaseException) -> InvalidRequestError:
    """Return the 422 error for a path under the data root that the file system cannot look up."""
    if isinstance(error, RuntimeError) or getattr(error, "errno", None) == errno.ELOOP:
        problem = "it goes through a symlink loop"
    elif getattr(error, "errno", None) == errno.ENAMETOOLONG:
        problem = "a folder or file name in it is too long for the file system (at most 255 bytes on most)"
    else:
        problem = f"the file system cannot look it up ({os.strerror(error.errno) if getattr(error, 'errno', None) else type(error).__name__})"
    return InvalidRequestError(
        f"path {shorten_echoed(requested)!r} cannot be used: {problem}. Send the path of a slide file relative to "
        "the data root (UNITE_STUDENT_DATA_ROOT).",
        value=shorten_echoed(requested),
    )
