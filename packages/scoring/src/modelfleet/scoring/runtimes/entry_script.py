"""Azure ML style entry scripts: `init()` once, `run(data)` per request.

Compatible with scripts written for Azure ML: the model folder is in
`MODELFLEET_MODEL_DIR` and `AZUREML_MODEL_DIR`; a plain `run(data)` gets the
request body as a string; a run() decorated with inference-schema's
`@input_schema` gets keyword arguments converted to the declared types; a
`@rawhttp` run() gets the request and may return an `AMLResponse`.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import threading
import types
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from .. import azureml_compat
from ..errors import InputError, ModelLoadError, RequestError, ScriptError, describe
from .base import RawResponse, ScoreInput, Signature, is_msgpack

_counter = itertools.count(1)


class _EnvTurn:
    """A lock whose holder can be given up on: a load past its timeout lets the next one run.

    init() reads the model folder from the process environment, so loads run one
    at a time; a hung init() would hold a plain lock forever and every later load
    would queue behind it. A released or abandoned holder's own release is a no-op.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._owner: object | None = None
        self._given_up: weakref.WeakSet[Any] = weakref.WeakSet()

    def acquire(self, owner: object) -> bool:
        """Wait for the turn; False when the load was given up on meanwhile."""
        with self._cond:
            while self._owner is not None and owner not in self._given_up:
                self._cond.wait()
            if owner in self._given_up:
                return False
            self._owner = owner
            return True

    def release(self, owner: object) -> None:
        with self._cond:
            if self._owner is owner:
                self._owner = None
                self._cond.notify_all()

    def give_up(self, owner: object) -> None:
        """Free the turn if `owner` holds it, and never hand it to `owner` again."""
        with self._cond:
            self._given_up.add(owner)
            if self._owner is owner:
                self._owner = None
            self._cond.notify_all()


# A refused version's changes to the environment are undone by ModelHost.prepare.
_env_turn = _EnvTurn()
_MODEL_DIR_VARS = ("MODELFLEET_MODEL_DIR", "AZUREML_MODEL_DIR")
# sys.path and the helper-module bookkeeping; held only briefly
_paths_lock = threading.Lock()
# folders of loaded entry scripts, counted: two versions may share one, and a
# version refused at warm-up must not take the serving one's folder off sys.path
_script_dirs: Counter[str] = Counter()


class EntryScriptRuntime:
    """A user's score.py, imported in a module namespace of its own."""

    platform = "python"

    def __init__(self, script: Path, model_dir: Path) -> None:
        self.script = script
        self.model_dir = model_dir
        self.raw = False
        self.module: types.ModuleType | None = None
        self._run: Any = None
        self._schema_decorated = False
        self._signature = Signature()

    def load(self) -> None:
        if not self.script.is_file():
            raise ModelLoadError("load", f"entry script not found: {self.script}")
        azureml_compat.install_import_shim()
        name = f"modelfleet_entry_{next(_counter)}_{_identifier(self.script.stem)}"
        spec = importlib.util.spec_from_file_location(name, self.script)
        if spec is None or spec.loader is None:
            raise ModelLoadError("load", f"cannot import entry script {self.script}")
        module = importlib.util.module_from_spec(spec)
        script_dir = str(self.script.parent.resolve())
        if not _env_turn.acquire(self):
            raise ModelLoadError("timeout", "given up while waiting for another load to finish")
        try:
            for var in _MODEL_DIR_VARS:
                os.environ[var] = str(self.model_dir)
            # helper modules next to score.py import as they do on Azure ML; another
            # version's folder must not shadow them, nor its cached helper modules
            with _paths_lock:
                while script_dir in sys.path:
                    sys.path.remove(script_dir)
                sys.path.insert(0, script_dir)
                _forget_helpers_outside(script_dir)
                # counted from here, not once loaded: a given-up load of this folder
                # that ends late (and lets go of it) must not pull it from under this one
                _script_dirs[script_dir] += 1
            for mod in _raw_flag_modules():
                setattr(mod, "_rawHttpRequested", False)  # noqa: B010
            sys.modules[name] = module
            try:
                run, raw_requested = self._import_and_init(spec.loader, module)
            except BaseException:
                # refused: the serving version keeps its sys.path and helpers
                sys.modules.pop(name, None)
                _let_go_of(script_dir)
                raise
        finally:
            _env_turn.release(self)
        self.module = module
        self._run = run
        self.raw = bool(getattr(run, azureml_compat.RAW_ATTR, False)) or raw_requested
        self._signature = self._read_schema(run)

    def abandon(self) -> None:
        """The host gave up on this load (timeout): let the next load take the environment."""
        _env_turn.give_up(self)

    def _import_and_init(self, loader: Any, module: types.ModuleType) -> tuple[Any, bool]:
        """Execute the script and call its init(); its run() and whether it asked for raw mode."""
        try:
            loader.exec_module(module)
        except BaseException as exc:
            raise ModelLoadError("load", f"importing {self.script.name} failed: {describe(exc)}") from exc
        raw_requested = any(getattr(m, "_rawHttpRequested", False) for m in _raw_flag_modules())
        run = getattr(module, "run", None)
        if not callable(run):
            raise ModelLoadError("load", f"{self.script.name} defines no run() function")
        init = getattr(module, "init", None)
        if callable(init):
            try:
                init()
            except BaseException as exc:
                raise ModelLoadError("load", f"init() raised {describe(exc)}") from exc
        return run, raw_requested

    def _read_schema(self, run: Any) -> Signature:
        sig = Signature()
        if "inference_schema" not in sys.modules or self.raw:
            return sig
        from inference_schema.schema_util import (
            get_input_schema,
            get_output_schema,
            is_schema_decorated,
        )

        if not is_schema_decorated(run):
            return sig
        in_schema = get_input_schema(run)
        out_schema = get_output_schema(run)
        self._schema_decorated = "properties" in in_schema
        sig.input_schema = in_schema if self._schema_decorated else None
        sig.output_schema = out_schema if out_schema.get("type") != "object" or len(out_schema) > 1 else None
        example = in_schema.get("example")
        if self._schema_decorated and isinstance(example, dict):
            sig.input_example = example
        return sig

    def signature(self) -> Signature:
        return self._signature

    def sample(self) -> ScoreInput | None:
        if self._signature.input_example is None:
            return None
        example = orjson.loads(orjson.dumps(self._signature.input_example))
        return ScoreInput(body=b"", decoded=example, is_decoded=True)

    def predict(self, request: ScoreInput) -> Any:
        if self.raw:
            req = azureml_compat.AMLRequest(
                request.method, request.path, request.query, request.headers, request.body
            )
            return _to_raw(self._call(req))
        if self._schema_decorated:
            data = request.data()
            if not isinstance(data, dict):
                raise InputError("request body must be a JSON object whose fields are run()'s parameters")
            return self._call_schema(data)
        return self._call(self._text_body(request))

    def _text_body(self, request: ScoreInput) -> str:
        # Azure ML hands a plain run() the body as text; scripts call json.loads on it.
        if is_msgpack(request.content_type):
            return orjson.dumps(request.data(), option=orjson.OPT_NON_STR_KEYS).decode()
        try:
            text = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("request body is not UTF-8 text") from None
        if "json" in request.content_type or not request.content_type:
            request.data()  # malformed JSON is the client's error, not the script's
        return text

    def _call(self, arg: Any) -> Any:
        try:
            return self._run(arg)
        except RequestError:
            # the request's own fault, found while run() read it (e.g. a malformed
            # multipart body behind request.files): the client's 4xx, not a 500
            raise
        except (Exception, SystemExit) as exc:  # sys.exit() in run() must not stop the server
            raise ScriptError(f"run() raised {describe(exc)}") from exc

    def _call_schema(self, data: dict[str, Any]) -> Any:
        try:
            return self._run(**data)
        except (Exception, SystemExit) as exc:
            if _entered(exc, self.script):
                raise ScriptError(f"run() raised {describe(exc)}") from exc
            # failed before run()'s body started: the input did not fit the declared schema
            props = (self._signature.input_schema or {}).get("properties", {})
            missing = [p for p in props if p not in data]
            unknown = [k for k in data if k not in props]
            if unknown:
                raise InputError(f"unknown field {unknown[0]!r}; run() takes {sorted(props)}") from None
            if missing:
                raise InputError(
                    f"missing field {missing[0]!r}: expected {_type_text(props[missing[0]])}"
                ) from None
            field = _schema_field(exc)
            if field in props:
                raise InputError(
                    f"input does not match run()'s input schema: field {field!r} expects "
                    f"{_type_text(props[field])}; {describe(exc)}"
                ) from None
            raise InputError(f"input does not match run()'s input schema: {describe(exc)}") from None

    def close(self) -> None:
        if self.module is not None:
            sys.modules.pop(self.module.__name__, None)
            script_dir = str(self.script.parent.resolve())
            _let_go_of(script_dir)
        self.module = None
        self._run = None


def _let_go_of(script_dir: str) -> None:
    """One load (or loaded version) of `script_dir` is gone: the last one takes it off sys.path."""
    # may run on the event loop (close()): never waits for another version's init()
    with _paths_lock:
        _script_dirs[script_dir] -= 1
        if _script_dirs[script_dir] <= 0:
            del _script_dirs[script_dir]
            while script_dir in sys.path:
                sys.path.remove(script_dir)
            _forget_modules_in(script_dir)


def _forget_modules_in(folder: str) -> None:
    """Drop modules imported from an entry script's folder (helpers beside score.py).

    Modules under another import root inside that folder (a venv, a src/ tree:
    any more specific sys.path entry) are libraries, not helpers, and stay.
    """
    prefix = folder.rstrip(os.sep) + os.sep
    roots = tuple(
        p.rstrip(os.sep) + os.sep
        for p in (os.path.abspath(e) for e in sys.path if e)
        if p.startswith(prefix)
    )
    for name, mod in list(sys.modules.items()):
        file = getattr(mod, "__file__", None)
        if (
            file
            and file.startswith(prefix)
            and not file.startswith(roots)
            and not name.startswith("modelfleet.")
        ):
            sys.modules.pop(name, None)


def _forget_helpers_outside(folder: str) -> None:
    """Drop cached helper modules of other entry-script folders so `import helper` finds ours.

    The other version keeps working: its code holds references to its own modules.
    """
    for other in list(_script_dirs):
        if other != folder:
            _forget_modules_in(other)


def _raw_flag_modules() -> list[types.ModuleType]:
    mods: list[types.ModuleType] = [azureml_compat]
    for name in ("azureml.contrib.services.aml_request", "azureml_inference_server_http.api.aml_request"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "_rawHttpRequested"):
            mods.append(mod)
    return mods


def _to_raw(result: Any) -> Any:
    """Turn an AMLResponse (ours or Flask's) into a RawResponse; pass other values through."""
    if isinstance(result, RawResponse):
        return result
    if hasattr(result, "status_code") and hasattr(result, "get_data"):
        headers = [(str(k), str(v)) for k, v in dict(result.headers).items()]
        return RawResponse(int(result.status_code), bytes(result.get_data()), headers)
    return result


def _entered(exc: BaseException, script: Path) -> bool:
    """Whether the traceback reached code in the script itself (run()'s body started)."""
    target = str(script.resolve())
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename == target or filename == str(script):
            return True
        tb = tb.tb_next
    return False


def _schema_field(exc: BaseException) -> str | None:
    """The parameter inference-schema was converting when `exc` was raised, if it was converting one.

    Each `@input_schema` wrapper converts its own parameter and then calls the
    next; the innermost wrapper frame in the traceback is the one that failed.
    """
    field = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "decorator_input" and frame.f_globals.get("__name__", "").startswith(
            "inference_schema."
        ):
            name = frame.f_locals.get("param_name")
            field = name if isinstance(name, str) else field
        tb = tb.tb_next
    return field


def _type_text(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "a value"
    kind = schema.get("type", "value")
    if kind == "array":
        return f"an array of {_type_text(schema.get('items'))}"
    fmt = schema.get("format")
    return f"{kind} ({fmt})" if fmt else str(kind)


def _identifier(stem: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in stem)
