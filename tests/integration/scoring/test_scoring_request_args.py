"""Raw mode: request.args / values / cookies behave as Flask's on Azure ML, over real HTTP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from modelfleet.scoring import ModelSpec

# what a raw-mode script reads: each field of the answer is one Flask behaviour
ECHO = '''
from azureml.contrib.services.aml_request import AMLRequest, rawhttp
from azureml.contrib.services.aml_response import AMLResponse


def init():
    pass


@rawhttp
def run(request):
    args, values, cookies = request.args, request.values, request.cookies
    return AMLResponse({
        "a": args.get("a"),
        "a_item": args["a"] if "a" in args else None,
        "a_list": args.getlist("a"),
        "n_int": args.get("n", type=int),
        "n_bad": args.get("bad", -1, type=int),
        "missing": args.get("nope", "dflt"),
        "args": args.to_dict(),
        "args_lists": args.to_dict(flat=False),
        "values": values.to_dict(flat=False),
        "value_q": values.get("q"),
        "session": cookies.get("session"),
        "cookies": cookies.to_dict(flat=False),
    }, 200)
'''


@pytest.fixture
def echo_server(start_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    script = tmp_path / "score.py"
    script.write_text(ECHO)
    server = start_server(ModelSpec(tmp_path, script))
    assert server.host.active.runtime.raw
    return server


def test_repeated_query_fields_give_the_first_value_and_getlist_all(echo_server) -> None:  # type: ignore[no-untyped-def]
    r = httpx.get(echo_server.url + "/score?a=1&a=2&n=7&bad=x&blank=&plus=a+b%21", timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["a"] == "1" and body["a_item"] == "1"  # Flask: the FIRST of repeated values
    assert body["a_list"] == ["1", "2"]
    assert (body["n_int"], body["n_bad"], body["missing"]) == (7, -1, "dflt")
    assert body["args"] == {"a": "1", "n": "7", "bad": "x", "blank": "", "plus": "a b!"}
    assert body["args_lists"]["a"] == ["1", "2"]
    # a GET has no form: values are the args
    assert body["values"] == body["args_lists"]
    assert body["session"] is None and body["cookies"] == {}


def test_values_combine_query_and_form_fields(echo_server) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(
        echo_server.url + "/score?a=q1&q=from-query", data={"a": "f1", "f": "from-form"}, timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    # args first, then form, as Flask's CombinedMultiDict
    assert body["values"] == {"a": ["q1", "f1"], "q": ["from-query"], "f": ["from-form"]}
    assert body["value_q"] == "from-query"
    assert body["args"] == {"a": "q1", "q": "from-query"}  # args alone hold no form field
    # a JSON body is no form: values are the args alone
    r = httpx.post(echo_server.url + "/score?q=1", json={"f": "x"}, timeout=30)
    assert r.json()["values"] == {"q": ["1"]}


def test_cookies_are_parsed_as_flask_does(echo_server) -> None:  # type: ignore[no-untyped-def]
    r = httpx.get(
        echo_server.url + "/score",
        headers={"Cookie": 'session=abc123; theme="dark mode"; session=second; flag'}, timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["session"] == "abc123"
    assert body["cookies"]["session"] == ["abc123", "second"]
    assert body["cookies"]["theme"] == ["dark mode"]


def test_nothing_is_parsed_or_imported_until_a_script_reads_it() -> None:
    code = (
        "import sys\n"
        "from modelfleet.scoring import azureml_compat as a\n"
        "r = a.AMLRequest('POST', '/score', 'a=1&a=2', {'Content-Type': 'application/json'}, b'{}')\n"
        "assert r._args is None and r._cookies is None\n"
        "assert r.args.getlist('a') == ['1', '2'] and r.values['a'] == '1'\n"
        "assert 'werkzeug' not in sys.modules  # no form body: values need no parser\n"
        "assert r.cookies == {}\n"
        "assert 'werkzeug' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
