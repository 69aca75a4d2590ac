"""Raw mode with form bodies, as Azure ML scripts read them: request.files / request.form over real HTTP."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import urllib3
from servicekit import missing_service

from modelfleet.scoring import ModelSpec

SCRIPTS = Path(__file__).resolve().parents[2] / "fixtures" / "scoring" / "scripts"


def _png(width: int = 4, height: int = 3) -> bytes:
    from PIL import Image

    image = Image.new("L", (width, height), 0)
    for x in range(width):
        image.putpixel((x, 0), 255)  # the top row bright, the rest dark
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def image_server(start_server, tmp_path):  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(tmp_path, SCRIPTS / "score_raw_image.py"))
    assert server.host.active.runtime.raw
    return server


def test_raw_script_reads_an_uploaded_image_and_form_fields(image_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    png = _png()
    body, content_type = urllib3.encode_multipart_formdata(
        [("image", ("digit.png", png, "image/png")), ("threshold", "200"), ("tag", "a"), ("tag", "b")]
    )
    r = httpx.post(
        image_server.url + "/score", params={"save_to": str(tmp_path)}, content=body,
        headers={"Content-Type": content_type}, timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "size": [4, 3], "bright_pixels": 4, "threshold": 200, "filename": "digit.png",
        "content_type": "image/png", "mimetype": "image/png", "tags": ["a", "b"], "saved": "digit.png",
        # as Flask: request.data is empty for a form body, get_data() is the raw body
        "data_len": 0, "body_len": len(body),
    }
    assert (tmp_path / "digit.png").read_bytes() == png  # FileStorage.save


def test_multipart_from_a_real_client_library(image_server) -> None:  # type: ignore[no-untyped-def]
    # httpx builds its own multipart body (quoted boundary, its own part headers)
    r = httpx.post(
        image_server.url + "/score", files={"image": ("x.png", _png(2, 2), "image/png")},
        data={"threshold": "1"}, timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["bright_pixels"] == 2 and r.json()["filename"] == "x.png"


def test_multipart_with_curl(image_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    if shutil.which("curl") is None:
        missing_service("curl is not installed (run.sh installs it)")
    picture = tmp_path / "pic.png"
    picture.write_bytes(_png(5, 1))
    out = subprocess.run(
        ["curl", "-sS", "-F", f"image=@{picture};type=image/png", "-F", "threshold=255",
         image_server.url + "/score"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    assert '"bright_pixels":5' in out.stdout and '"filename":"pic.png"' in out.stdout


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda body, ct: (body, ct.replace("boundary=", "boundary=x")),
         "malformed multipart/form-data body: no part starts with the boundary"),
        (lambda body, ct: (body[: len(body) // 2], ct),
         "malformed multipart/form-data body: the body ends inside a part, before the closing boundary"),
        (lambda body, ct: (body, "multipart/form-data"),
         "malformed multipart/form-data body: the Content-Type header has no boundary parameter"),
        (lambda body, ct: (b"", ct), "malformed multipart/form-data body: the body is empty"),
    ],
    ids=["wrong-boundary", "truncated", "no-boundary", "empty"],
)
def test_malformed_multipart_is_a_400_naming_the_problem(image_server, mangle, message) -> None:  # type: ignore[no-untyped-def]
    body, content_type = urllib3.encode_multipart_formdata({"image": ("a.png", _png(), "image/png")})
    body, content_type = mangle(body, content_type)
    r = httpx.post(image_server.url + "/score", content=body, headers={"Content-Type": content_type}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(message)
    assert "x-ms-run-function-failed" not in r.headers  # the client's fault, not run()'s
    # the server keeps serving
    good, ct = urllib3.encode_multipart_formdata({"image": ("a.png", _png(), "image/png")})
    assert httpx.post(image_server.url + "/score", content=good, headers={"Content-Type": ct}).status_code == 200


def test_a_missing_file_part_is_a_400_naming_it(image_server) -> None:  # type: ignore[no-untyped-def]
    body, content_type = urllib3.encode_multipart_formdata({"picture": ("a.png", _png(), "image/png"), "threshold": "3"})
    r = httpx.post(image_server.url + "/score", content=body, headers={"Content-Type": content_type}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "the request has no file 'image' (it has files: 'picture')"
    # a JSON body has no files at all
    r = httpx.post(image_server.url + "/score", json={"image": "x"}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"] == "the request has no file 'image' (it has files: none)"


def test_form_parsing_is_not_imported_until_a_script_asks() -> None:
    # start-up and memory stay as they were for every model that never reads a form
    code = (
        "import sys\n"
        "from modelfleet.scoring import azureml_compat as a\n"
        "r = a.AMLRequest('POST', '/score', '', {'Content-Type': 'application/x-www-form-urlencoded'}, b'x=1&x=2&y=')\n"
        "assert r.get_data() == b'x=1&x=2&y=' and r.data == b''\n"
        "assert 'werkzeug' not in sys.modules\n"
        "assert r.form.getlist('x') == ['1', '2'] and r.form['y'] == '' and len(r.files) == 0\n"
        "assert r.get_data(parse_form_data=True) == b''\n"
        "assert 'werkzeug' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_form_body_over_the_part_limit_is_413(image_server) -> None:  # type: ignore[no-untyped-def]
    from modelfleet.scoring.formdata import MAX_FORM_PARTS

    fields = [("tag", "x")] * (MAX_FORM_PARTS + 1) + [("image", ("a.png", _png(), "image/png"))]
    body, content_type = urllib3.encode_multipart_formdata(fields)
    r = httpx.post(image_server.url + "/score", content=body, headers={"Content-Type": content_type}, timeout=30)
    assert r.status_code == 413, r.text
    assert r.json()["error"] == f"malformed multipart/form-data body: more than {MAX_FORM_PARTS} parts"
    assert httpx.get(image_server.url + "/v2/health/live").status_code == 200
