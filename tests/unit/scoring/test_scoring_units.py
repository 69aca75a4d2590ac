"""Small pieces without a server: keys files, tensor validation, the Azure ML import shim."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from modelfleet.scoring import ConfigError, InputError
from modelfleet.scoring.auth import KeyRing
from modelfleet.scoring.runtimes.base import TensorSpec
from modelfleet.scoring.tensors import to_array, to_feeds


def test_keys_file_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("nope")
    with pytest.raises(ConfigError) as info:
        KeyRing(path)
    assert info.value.field == "keys_file"
    assert "is not JSON" in str(info.value)
    path.write_text(json.dumps({"secondary": "x"}))
    with pytest.raises(ConfigError, match='needs a non-empty "primary" key'):
        KeyRing(path)
    path.write_text(json.dumps({"primary": "p", "secondary": 5}))
    with pytest.raises(ConfigError, match='"secondary" must be a string'):
        KeyRing(path)
    admin = tmp_path / "admin"
    admin.write_text("\n")
    with pytest.raises(ConfigError, match="is empty; it must hold one token"):
        KeyRing(admin, single_token=True)


def test_keyring_accepts_either_key_only_as_bearer(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"primary": "p", "secondary": "s"}))
    ring = KeyRing(path)
    assert ring.check("Bearer p") and ring.check("bearer s")
    assert not ring.check("Bearer x") and not ring.check("p") and not ring.check(None)
    assert KeyRing().check(None)  # no keys configured: open


def test_tensor_validation_messages() -> None:
    spec = TensorSpec("img", "float32", (-1, 2, 2))
    assert to_array([[1, 2], [3, 4]], spec).shape == (1, 2, 2)
    with pytest.raises(InputError, match=r"input 'img': expected shape \[N, 2, 2\] \(float32\), got \[1, 2, 3\]"):
        to_array([[[1, 2, 3], [1, 2, 3]]], spec)
    with pytest.raises(InputError, match="input 'img': expected float32 values"):
        to_array([[[1, 2], [3, 4]], [[1], [2, 3]]], spec)
    two = [TensorSpec("a", "int64", (-1,)), TensorSpec("b", "float32", (-1,))]
    with pytest.raises(InputError, match="this model has several inputs"):
        to_feeds({"data": [1]}, two)
    with pytest.raises(InputError, match="missing input 'b': expected float32 with shape"):
        to_feeds({"data": {"a": [1]}}, two)
    feeds = to_feeds({"data": {"a": [1, 2], "b": [0.5, 1]}}, two)
    assert feeds["a"].dtype == np.int64 and feeds["b"].dtype == np.float32


def test_azureml_shim_serves_the_import_paths_only_when_missing() -> None:
    from modelfleet.scoring import azureml_compat

    azureml_compat.install_import_shim()
    azureml_compat.install_import_shim()  # idempotent
    assert sys.meta_path.count(azureml_compat._finder) == 1
    assert sys.meta_path[-1] is azureml_compat._finder  # last: a real package always wins
    req = importlib.import_module("azureml.contrib.services.aml_request")
    resp = importlib.import_module("azureml.contrib.services.aml_response")
    assert req.rawhttp is azureml_compat.rawhttp and resp.AMLResponse is azureml_compat.AMLResponse
    r = resp.AMLResponse({"a": 1}, 202, json_str=True)
    assert (r.status_code, r.get_data(), r.headers["Content-Type"]) == (202, b'{"a":1}', "application/json")
    request = req.AMLRequest("POST", "/score", "a=1&b=", {"Content-Type": "application/json"}, b'{"x": 2}')
    assert request.args == {"a": "1", "b": ""}
    assert request.headers["content-type"] == "application/json"
    assert request.get_json() == {"x": 2} and request.get_data(as_text=True) == '{"x": 2}'


def test_missing_tflite_runtime_is_a_clear_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelfleet.scoring import ModelLoadError
    from modelfleet.scoring.runtimes import tflite

    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(ModelLoadError) as info:
        tflite.interpreter_class()
    assert info.value.stage == "load"
    assert "no TFLite runtime installed" in info.value.reason


def test_model_folder_and_entry_script_errors_name_the_problem(tmp_path: Path) -> None:
    from modelfleet.scoring import ModelHost, ModelLoadError, ModelSpec

    host = ModelHost()

    def refused(spec: ModelSpec) -> str:
        with pytest.raises(ModelLoadError) as info:
            host.load(spec)
        assert info.value.stage == "load"
        return info.value.reason

    two = tmp_path / "two"
    two.mkdir()
    (two / "a.onnx").write_bytes(b"x")
    (two / "b.tflite").write_bytes(b"x")
    assert refused(ModelSpec(two)) == f"{two} holds several models (a.onnx, b.tflite); give an entry script to choose"
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert refused(ModelSpec(notes)) == f"{notes} is not an .onnx or .tflite file"
    assert refused(ModelSpec(tmp_path, "nope.py")).startswith("entry script not found: ")
    (tmp_path / "no_run.py").write_text("def init():\n    pass\n")
    assert refused(ModelSpec(tmp_path, "no_run.py")) == "no_run.py defines no run() function"
    (tmp_path / "broken.py").write_text("def run(:\n")
    assert refused(ModelSpec(tmp_path, "broken.py")).startswith("importing broken.py failed: SyntaxError")
    (tmp_path / "bad_import.py").write_text("import not_a_module_anywhere\n")
    assert refused(ModelSpec(tmp_path, "bad_import.py")) == (
        "importing bad_import.py failed: ModuleNotFoundError: No module named 'not_a_module_anywhere'"
    )
    assert host.active is None
    assert host.metrics.load_failures == 6


def test_raw_responses_that_cannot_go_on_the_wire_are_named() -> None:
    from modelfleet.scoring.runtimes.base import RawResponse
    from modelfleet.scoring.server import _raw_response_problem

    assert _raw_response_problem(RawResponse(201, b"", [("X-Ok", "yes")])) is None
    assert _raw_response_problem(RawResponse(1000, b"")) == "an invalid HTTP status 1000"
    assert _raw_response_problem(RawResponse(200, b"", [("Bad Name", "x")])) == "an invalid response header 'Bad Name': 'x'"
    assert _raw_response_problem(RawResponse(200, b"", [("X-Name", "Zoë ☃")])) == (
        "a response header that is not Latin-1 text: 'X-Name'"
    )


def test_query_args_behave_as_a_flask_multidict() -> None:
    from modelfleet.scoring.azureml_compat import QueryArgs

    args = QueryArgs([("a", "1"), ("b", "x"), ("a", "2"), ("a", "z")])
    assert args == {"a": "1", "b": "x"} and args["a"] == "1"
    assert args.getlist("a") == ["1", "2", "z"] and args.getlist("a", type=int) == [1, 2]
    assert args.getlist("none") == [] and args.get("b", type=int) is None
    copy = args.copy()
    args["a"] = "9"  # setting replaces every value, as MultiDict does
    assert args.getlist("a") == ["9"] and copy.getlist("a") == ["1", "2", "z"]
    del args["b"]
    assert args.to_dict(flat=False) == {"a": ["9"]} and "b" not in args
    assert repr(copy) == "QueryArgs([('a', '1'), ('a', '2'), ('a', 'z'), ('b', 'x')])"
