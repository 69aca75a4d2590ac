"""Raw-request mode as Azure ML scripts write it: `rawhttp`, `AMLRequest`, `AMLResponse`.

Scripts import these from `azureml.contrib.services.aml_request` /
`aml_response` (or `azureml_inference_server_http.api.*`). When the real
packages are installed they win; otherwise `install_import_shim()` serves
those module paths from here, through an import finder placed *last* on
`sys.meta_path`, so it never shadows or overwrites a real installation.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl

import orjson

RAW_ATTR = "__modelfleet_raw_request__"
#: the bodies Flask parses into request.form/.files (defined here, not in formdata.py,
#: which imports werkzeug)
FORM_MIMETYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

# The real module keeps this flag; scripts only ever apply the decorator.
_rawHttpRequested = False


def rawhttp(func: Callable[..., Any]) -> Callable[..., Any]:
    """Mark run() as wanting the HTTP request itself (an AMLRequest) instead of parsed data."""
    global _rawHttpRequested
    _rawHttpRequested = True
    setattr(func, RAW_ATTR, True)
    return func


class Headers(Mapping[str, str]):
    """Case-insensitive, read-only request headers."""

    def __init__(self, items: Mapping[str, str]) -> None:
        self._items = {k.lower(): v for k, v in items.items()}

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str, default: Any = None) -> Any:
        return self._items.get(key.lower(), default)


class QueryArgs(dict[str, str]):
    """Query-string fields as Flask's `request.args` has them (a MultiDict): `args["a"]`
    and `.get("a")` give the FIRST of repeated values, `.getlist("a")` all of them.

    A dict subclass rather than werkzeug's MultiDict: `request.args` is common in
    raw scripts, and werkzeug costs ~35 ms and ~4.5 MiB to import.
    """

    def __init__(self, pairs: list[tuple[str, str]] | None = None) -> None:
        super().__init__()
        self._lists: dict[str, list[str]] = {}
        for key, value in pairs or ():
            self.add(key, value)

    def add(self, key: str, value: str) -> None:
        """Append a value (the first one stays what `[key]` returns)."""
        values = self._lists.get(key)
        if values is None:
            self._lists[key] = [value]
            super().__setitem__(key, value)
        else:
            values.append(value)

    def __setitem__(self, key: str, value: str) -> None:
        self._lists[key] = [value]
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        del self._lists[key]

    def get(self, key: str, default: Any = None, type: Callable[[str], Any] | None = None) -> Any:
        """The first value, converted by `type` if given; `default` if absent or not convertible."""
        if key not in self:
            return default
        value = self[key]
        if type is None:
            return value
        try:
            return type(value)
        except (ValueError, TypeError):
            return default

    def getlist(self, key: str, type: Callable[[str], Any] | None = None) -> list[Any]:
        """Every value of `key` in order (values `type` cannot convert are left out, as werkzeug does)."""
        values = self._lists.get(key, [])
        if type is None:
            return list(values)
        out = []
        for value in values:
            with suppress(ValueError, TypeError):
                out.append(type(value))
        return out

    def lists(self) -> Iterator[tuple[str, list[str]]]:
        return ((key, list(values)) for key, values in self._lists.items())

    def to_dict(self, flat: bool = True) -> dict[str, Any]:
        """{key: first value}, or with flat=False {key: [values]}."""
        return dict(self) if flat else dict(self.lists())

    def copy(self) -> QueryArgs:
        return QueryArgs([(key, value) for key, values in self._lists.items() for value in values])

    def __repr__(self) -> str:
        pairs = [(key, value) for key, values in self._lists.items() for value in values]
        return f"{type(self).__name__}({pairs!r})"


class AMLRequest:
    """The subset of Flask's Request that raw-mode scripts use.

    method, path, headers, args, values, cookies, the body (`get_data()`,
    `data`, `get_json()`) and form bodies (`files`, `form`), the latter parsed
    by werkzeug, as on Azure ML. Nothing is parsed until the script reads it.
    """

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> None:
        self.method = method
        self.path = path
        self.query_string = query.encode("latin-1")
        self.full_path = f"{path}?{query}"
        self.headers = Headers(headers)
        self._query = query
        self._args: QueryArgs | None = None
        self._cookies: Any = None
        self._body = body
        self.content_type = self.headers.get("content-type", "")
        self.mimetype = self.content_type.split(";", 1)[0].strip().lower()
        self.content_length = len(body)
        self._form: Any = None
        self._files: Any = None

    @property
    def args(self) -> QueryArgs:
        """Query-string fields: `args["a"]` is the first `a`, `args.getlist("a")` all of them."""
        if self._args is None:
            self._args = QueryArgs(parse_qsl(self._query, keep_blank_values=True))
        return self._args

    @property
    def values(self) -> QueryArgs:
        """`args` and then `form` fields in one (as Flask's `request.values`; a GET has args only)."""
        if self.method == "GET" or self.mimetype not in FORM_MIMETYPES:
            return self.args  # no form to add: nothing parsed, nothing imported
        combined = self.args.copy()
        for key, values in self.form.lists():
            for value in values:
                combined.add(key, value)
        return combined

    @property
    def cookies(self) -> Any:
        """The Cookie header's cookies, a werkzeug MultiDict as Flask's (parsed by werkzeug on first use)."""
        if self._cookies is None:
            from werkzeug.http import parse_cookie

            self._cookies = parse_cookie(self.headers.get("cookie"))
        return self._cookies

    def get_data(self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False) -> Any:
        """The body; with parse_form_data, a form body is parsed into files/form and b"" returned (as Flask)."""
        data = self._body
        if parse_form_data and self.mimetype in FORM_MIMETYPES:
            self._parse_form()
            data = b""
        return data.decode("utf-8", "replace") if as_text else data

    @property
    def data(self) -> bytes:
        """The body, empty for a form body (read `files`/`form`), as Flask's `request.data`."""
        return b"" if self.mimetype in FORM_MIMETYPES else self._body

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        if not force and "json" not in self.mimetype:
            return None
        try:
            return orjson.loads(self._body)
        except orjson.JSONDecodeError:
            if silent:
                return None
            raise

    @property
    def json(self) -> Any:
        return self.get_json()

    @property
    def files(self) -> Any:
        """Uploaded files of a multipart body: name -> werkzeug FileStorage (empty for other bodies).

        A malformed body raises InputError, answered 400 unless run() catches it.
        """
        if self._files is None:
            self._parse_form()
        return self._files

    @property
    def form(self) -> Any:
        """Plain fields of a multipart or urlencoded body: name -> str (a werkzeug MultiDict)."""
        if self._form is None:
            self._parse_form()
        return self._form

    def _parse_form(self) -> None:
        if self._form is not None:
            return
        from .formdata import parse_form

        self._form, self._files = parse_form(self._body, self.content_type)


class AMLResponse:
    """A full response from run(): body, status code, headers (as in azureml.contrib.services)."""

    def __init__(
        self,
        message: Any,
        status_code: int,
        response_headers: Mapping[str, str] | None = None,
        json_str: bool = False,
        run_function_failed: bool = False,
    ) -> None:
        self.status_code = int(status_code)
        self.headers: dict[str, str] = dict(response_headers or {})
        self.run_function_failed = run_function_failed
        if json_str or isinstance(message, dict | list):
            self._data = orjson.dumps(message, option=orjson.OPT_SERIALIZE_NUMPY)
            self.headers.setdefault("Content-Type", "application/json")
        elif isinstance(message, bytes | bytearray):
            self._data = bytes(message)
        elif message is None:
            self._data = b""
        else:
            self._data = str(message).encode("utf-8")
            self.headers.setdefault("Content-Type", "text/html; charset=utf-8")

    def get_data(self, as_text: bool = False) -> Any:
        return self._data.decode("utf-8", "replace") if as_text else self._data

    @property
    def data(self) -> bytes:
        return self._data


_PACKAGES = {"azureml", "azureml.contrib", "azureml.contrib.services", "azureml_inference_server_http", "azureml_inference_server_http.api"}
_MODULES = {
    "azureml.contrib.services.aml_request": ("rawhttp", "AMLRequest", "_rawHttpRequested"),
    "azureml.contrib.services.aml_response": ("AMLResponse",),
    "azureml_inference_server_http.api.aml_request": ("rawhttp", "AMLRequest", "_rawHttpRequested"),
    "azureml_inference_server_http.api.aml_response": ("AMLResponse",),
}


if TYPE_CHECKING:
    import importlib.abc


class _ShimFinder:
    """Serves the Azure ML raw-request modules only when nothing else on sys.meta_path can.

    Finder and loader by protocol, not by subclassing `importlib.abc`: importing
    that pulls in importlib.resources, tempfile, shutil, bz2 and lzma (~12 ms, 0.5-3 MiB).
    """

    def find_spec(
        self, fullname: str, path: Any = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname in _PACKAGES or fullname in _MODULES:
            return importlib.machinery.ModuleSpec(
                fullname, cast("importlib.abc.Loader", self), is_package=fullname in _PACKAGES
            )
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ in _PACKAGES:
            module.__path__ = []
            return
        this = sys.modules[__name__]
        for attr in _MODULES[module.__name__]:
            setattr(module, attr, getattr(this, attr))


_finder = _ShimFinder()


def install_import_shim() -> None:
    """Make the Azure ML raw-request import paths resolvable (a no-op where they are installed)."""
    if _finder not in sys.meta_path:
        sys.meta_path.append(_finder)
