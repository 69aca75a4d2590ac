"""Upgrade requests (h2c, WebSocket) are served as plain HTTP/1.1 (RFC 9110 §7.8): never a 101, never a 400."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import orjson
import pytest
from servicekit import missing_service

from modelfleet.scoring import ModelSpec

H2C = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
)


def _exchange(port: int, payload: bytes, responses: int, *, until_closed: bool = False) -> bytes:
    """Send payload on one connection; read `responses` complete responses (or until closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not until_closed and _complete(data) >= responses:
                break
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _complete(data: bytes) -> int:
    """How many whole responses (head + content-length body) data holds."""
    count, pos = 0, 0
    while (end := data.find(b"\r\n\r\n", pos)) >= 0:
        head = data[pos:end].lower()
        length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0]) if b"content-length: " in head else 0
        if len(data) < end + 4 + length:
            break
        count, pos = count + 1, end + 4 + length
    return count


@pytest.fixture
def digits_server(start_server, digits_onnx):  # type: ignore[no-untyped-def]
    return start_server(ModelSpec(digits_onnx.parent, name="digits"), max_body_bytes=100_000)


def _row_body(digits_rows: list[list[float]]) -> bytes:
    return orjson.dumps({"data": digits_rows[:1]})


def test_h2c_upgrade_is_served_as_http11_and_the_connection_stays_open(digits_server) -> None:  # type: ignore[no-untyped-def]
    payload = (
        b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n" + H2C + b"x-request-id: up\r\n\r\n"
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nx-request-id: next\r\n\r\n"
    )
    data = _exchange(digits_server.server.port, payload, 2)
    assert data.count(b"HTTP/1.1 200 OK") == 2, data
    assert b"101" not in data.split(b"\r\n")[0] and b"upgrade" not in data.lower()
    assert data.index(b"x-request-id: up") < data.index(b'{"ready":true}') < data.index(b"x-request-id: next")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_h2c_upgrade_with_a_body_scores_it(digits_server, digits_rows, framing) -> None:  # type: ignore[no-untyped-def]
    body = _row_body(digits_rows)
    if framing == "chunked":
        half = len(body) // 2
        framed = b"transfer-encoding: chunked\r\n\r\n" + b"".join(
            f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:half], body[half:])
        ) + b"0\r\n\r\n"
    else:
        framed = f"content-length: {len(body)}\r\n\r\n".encode() + body
    payload = (
        b"POST /score HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n" + H2C + framed
        + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"  # pipelined behind it
    )
    data = _exchange(digits_server.server.port, payload, 2)
    assert data.startswith(b"HTTP/1.1 200 OK"), data
    assert b'"label":[0]' in data
    assert data.count(b"HTTP/1.1 200 OK") == 2 and data.endswith(b'{"live":true}')


def test_upgrade_request_in_several_packets_and_over_the_body_limit(digits_server, digits_rows) -> None:  # type: ignore[no-untyped-def]
    body = _row_body(digits_rows)
    with socket.create_connection(("127.0.0.1", digits_server.server.port), timeout=10) as s:
        head = b"POST /score HTTP/1.1\r\nHost: x\r\n" + H2C + f"content-length: {len(body)}\r\n\r\n".encode()
        for piece in (head[:20], head[20:], body[:10], body[10:]):
            s.sendall(piece)
            time.sleep(0.01)  # separate packets, not synchronisation: the answer is awaited below
        data = b""
        while _complete(data) < 1:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK") and b'"label":[0]' in data
    big = b"POST /score HTTP/1.1\r\nHost: x\r\n" + H2C + b"content-length: 200000\r\n\r\n"
    data = _exchange(digits_server.server.port, big, 1, until_closed=True)
    assert data.startswith(b"HTTP/1.1 413")
    assert b"request body of 200000 bytes exceeds the limit of 100000 bytes" in data


def test_websocket_upgrade_gets_a_normal_response(digits_server) -> None:  # type: ignore[no-untyped-def]
    payload = (
        b"GET /v2/models/digits HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    data = _exchange(digits_server.server.port, payload, 1)
    assert data.startswith(b"HTTP/1.1 200 OK"), data
    assert b'"name":"digits"' in data and b"sec-websocket-accept" not in data.lower()


def test_connect_is_answered_and_the_tunnel_is_not_served(digits_server) -> None:  # type: ignore[no-untyped-def]
    payload = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nGET /v2/health/live HTTP/1.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", digits_server.server.port), timeout=10) as s:
        s.sendall(payload)
        data = b""
        # the server closes the connection: recv returns b"" (a socket timeout fails the test)
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 404") and b"no such endpoint: CONNECT example.com:443" in data
    assert data.count(b"HTTP/1.1 ") == 1 and b"connection: close" in data


def test_curl_http2_against_the_server(digits_server, digits_rows, tmp_path) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("curl") is None:
        missing_service("curl is not installed (run.sh installs it)")
    small = _row_body(digits_rows)
    large = orjson.dumps({"data": digits_rows[:8]})  # over 1 KiB: curl adds Expect: 100-continue
    assert len(large) > 1024
    for body, labels in ((small, [0]), (large, [0, 1, 2, 3, 4, 5, 6, 7])):
        (tmp_path / "body.json").write_bytes(body)
        out = subprocess.run(
            ["curl", "-sS", "--http2", "-m", "20", "-H", "Content-Type: application/json",
             "--data-binary", f"@{tmp_path / 'body.json'}", "-w", "\\n%{http_code} %{http_version}",
             digits_server.url + "/score"],
            capture_output=True, text=True, timeout=30, check=True,
        )
        text, status = out.stdout.rsplit("\n", 1)
        assert status == "200 1.1", out
        assert orjson.loads(text)["label"] == labels
