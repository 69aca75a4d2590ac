"""Form bodies (multipart/form-data, urlencoded) for raw-mode scripts, parsed by werkzeug as Flask does.

Imported only when a script first touches `request.files` / `request.form`:
werkzeug costs ~35 ms and ~4.5 MiB to import, which no other request pays.
Scripts get werkzeug's own `MultiDict` and `FileStorage` (what
`flask.request.files` holds on Azure ML), so `Image.open(request.files["image"])`,
`.read()`, `.save(path)` and `.getlist()` behave as they do there.
"""

from __future__ import annotations

from io import BytesIO
from typing import IO, Any

from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header

from .azureml_compat import FORM_MIMETYPES
from .errors import InputError

#: as Flask's default: many tiny parts cost parsing time out of proportion to the body size
MAX_FORM_PARTS = 1000

__all__ = ["FORM_MIMETYPES", "FileStorage", "FormFields", "MissingFormField", "parse_form"]


class MissingFormField(InputError, KeyError):
    """`request.files[name]` / `request.form[name]` for a name the request did not send (HTTP 400).

    A KeyError too, so a script's `except KeyError` still catches it.
    """

    def __str__(self) -> str:  # KeyError would print the message quoted
        return self.message


class FormFields(MultiDict[str, Any]):
    """werkzeug's MultiDict whose missing key names what the request did hold."""

    kind = "form field"

    def __getitem__(self, key: str) -> Any:
        try:
            return super().__getitem__(key)
        except KeyError:
            held = ", ".join(repr(k) for k in self.keys()) or "none"
            raise MissingFormField(
                f"the request has no {self.kind} {key!r} (it has {self.kind}s: {held})"
            ) from None


class FormFiles(FormFields):
    kind = "file"


def _in_memory(
    total_content_length: int | None,
    content_type: str | None,
    filename: str | None,
    content_length: int | None = None,
) -> IO[bytes]:
    # the body is already in memory and bounded by --max-body-bytes: no temp files
    return BytesIO()


def parse_form(body: bytes, content_type: str) -> tuple[FormFields, FormFiles]:
    """The plain fields and the files of a form body; InputError (400) naming what is malformed."""
    mimetype, options = parse_options_header(content_type)
    files = FormFiles()
    if mimetype not in FORM_MIMETYPES:
        return FormFields(), files
    if mimetype == "multipart/form-data":
        if not options.get("boundary"):
            raise InputError(
                "malformed multipart/form-data body: the Content-Type header has no boundary parameter"
            )
        if not body:
            raise InputError("malformed multipart/form-data body: the body is empty")
    parser = FormDataParser(
        stream_factory=_in_memory, cls=FormFields, silent=False, max_form_parts=MAX_FORM_PARTS
    )
    try:
        _, form, parsed_files = parser.parse(BytesIO(body), mimetype, len(body), options)
    except RequestEntityTooLarge:
        raise InputError(
            f"malformed {mimetype} body: more than {MAX_FORM_PARTS} parts", status=413
        ) from None
    except ValueError as exc:
        raise InputError(f"malformed {mimetype} body: {_explain(str(exc), options)}") from None
    files.update(parsed_files)  # a FormFiles, so a missing file is named as a file
    return form, files  # type: ignore[return-value]


def _explain(problem: str, options: dict[str, str]) -> str:
    """werkzeug's parser message ("cannot parse beyond State.PREAMBLE") in the client's terms."""
    boundary = options.get("boundary", "")
    if "PREAMBLE" in problem:
        return f"no part starts with the boundary {boundary!r} named in the Content-Type header"
    if "State." in problem:
        return f"the body ends inside a part, before the closing boundary '--{boundary}--' (truncated?)"
    return problem
