"""Limits and bad input: body size, timeouts, a full queue, slow scoring next to health checks."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from modelfleet.scoring import ModelSpec

SCRIPTS = Path(__file__).resolve().parents[2] / "fixtures" / "scoring" / "scripts"


@pytest.fixture
def slow_spec(tmp_path: Path) -> ModelSpec:
    return ModelSpec(tmp_path, SCRIPTS / "score_slow.py", name="slow", version="1")


def test_body_over_limit_gets_413_and_server_keeps_serving(start_server, digits_onnx) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(digits_onnx.parent), max_body_bytes=1000)
    r = httpx.post(server.url + "/score", content=b"x" * 5000)
    assert r.status_code == 413
    assert r.json()["error"] == "request body of 5000 bytes exceeds the limit of 1000 bytes"

    # chunked bodies are counted as they arrive
    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"y" * 400

    r = httpx.post(server.url + "/score", content=chunks())
    assert r.status_code == 413
    assert "exceeds the limit of 1000 bytes" in r.json()["error"]
    assert httpx.post(server.url + "/score", json={"data": [[0] * 64]}).status_code == 200


def test_slow_run_gets_504_after_the_timeout(start_server, slow_spec) -> None:  # type: ignore[no-untyped-def]
    server = start_server(slow_spec, scoring_timeout_ms=200)
    with server.client() as c:
        r = c.post("/score", json={"sleep_ms": 2000})
        assert r.status_code == 504
        assert r.json()["error"] == "scoring timed out after 200 ms"
        assert c.post("/score", json={"sleep_ms": 1}).json() == {"slept_ms": 1}


def test_slow_run_never_blocks_health_checks(start_server, slow_spec) -> None:  # type: ignore[no-untyped-def]
    server = start_server(slow_spec, max_concurrent_requests=2)
    started = threading.Event()

    def slow() -> int:
        started.set()
        return httpx.post(server.url + "/score", json={"sleep_ms": 3000}, timeout=30).status_code

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(slow) for _ in range(2)]
        started.wait(5)
        deadline = time.monotonic() + 10
        while server.server.pending < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert server.server.pending == 2
        with server.client() as c:
            t0 = time.monotonic()
            for _ in range(10):
                assert c.get("/v2/health/ready").status_code == 200
            # blocked behind the slow calls they would take ~3 s
            assert time.monotonic() - t0 < 2.0
            assert server.server.pending == 2
        assert [f.result() for f in futures] == [200, 200]


def test_full_queue_gets_503_with_retry_after(start_server, slow_spec) -> None:  # type: ignore[no-untyped-def]
    server = start_server(slow_spec, max_concurrent_requests=1, max_queued_requests=1)

    def call() -> httpx.Response:
        return httpx.post(server.url + "/score", json={"sleep_ms": 800}, timeout=30)

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: call(), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2
    busy = [r for r in responses if r.status_code == 503]
    assert busy, codes
    assert busy[0].headers["retry-after"] == "1"
    assert "server busy" in busy[0].json()["error"]
    assert server.server.metrics.rejected == len(busy)
    assert httpx.post(server.url + "/score", json={"sleep_ms": 1}).status_code == 200


def _raw_exchange(port: int, payload: bytes, expect_responses: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        data = b""
        deadline = time.monotonic() + 10
        while data.count(b"HTTP/1.1 ") < expect_responses and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_pipelined_requests_are_answered_in_order(start_server, slow_spec, digits_onnx) -> None:  # type: ignore[no-untyped-def]
    server = start_server(slow_spec)
    bodies = [b'{"sleep_ms": 300}', b'{"sleep_ms": 1}', b'{"sleep_ms": 100}']
    payload = b"".join(
        b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"x-request-id: r{i}\r\nContent-Length: {len(b)}\r\n\r\n".encode() + b
        for i, b in enumerate(bodies)
    ) + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nx-request-id: r3\r\n\r\n"
    data = _raw_exchange(server.server.port, payload, 4)
    ids = [line.split(b": ")[1] for line in data.split(b"\r\n") if line.startswith(b"x-request-id")]
    assert ids == [b"r0", b"r1", b"r2", b"r3"]
    assert data.index(b'{"slept_ms":300}') < data.index(b'{"slept_ms":1}') < data.index(b'{"slept_ms":100}')


def test_pipelined_inline_requests_and_malformed_http(start_server, digits_onnx) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(digits_onnx.parent))
    assert server.host.active.inline
    body = b'{"data": [[0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]]}'
    one = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    data = _raw_exchange(server.server.port, one * 50, 50)
    assert data.count(b"HTTP/1.1 200 OK") == 50
    assert data.count(b'"label":[0]') == 50
    bad = _raw_exchange(server.server.port, b"BLAH\x00 / HTTP/1.1\r\n\r\n", 1)
    assert bad.startswith(b"HTTP/1.1 400")
    assert b"malformed HTTP request" in bad


def test_fast_script_moves_inline_and_a_slow_call_moves_it_back(start_server, slow_spec) -> None:  # type: ignore[no-untyped-def]
    from modelfleet.scoring.host import PROMOTE_AFTER

    server = start_server(slow_spec, inline_threshold_ms=5)
    model = server.host.active
    assert model is not None and not model.inline  # a plain run() has no sample to time
    with server.client() as c:
        # a streak of PROMOTE_AFTER fast calls; a busy machine may break a streak
        for _ in range(20 * PROMOTE_AFTER):
            assert c.post("/score", json={"sleep_ms": 0}).status_code == 200
            if model.inline:
                break
        assert model.inline
        assert c.post("/score", json={"sleep_ms": 150}).status_code == 200
        assert model.inline  # one slow call may be the machine's fault
        for _ in range(2):
            assert c.post("/score", json={"sleep_ms": 150}).status_code == 200
        assert not model.inline and model.pool_only
        for _ in range(PROMOTE_AFTER):
            c.post("/score", json={"sleep_ms": 0})
        assert not model.inline


def test_head_gets_headers_only_and_stop_drains_requests_in_progress(start_server, slow_spec) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    server = start_server(slow_spec)
    head = httpx.head(server.url + "/v2/health/ready")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(b'{"ready":true}')

    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, server.url + "/score", json={"sleep_ms": 400}, timeout=30)
        deadline = time.monotonic() + 10
        while server.server.pending < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop).result(10)
        assert slow.result().json() == {"slept_ms": 400}
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/v2/health/live")


def test_expect_continue_and_oversized_headers(start_server, digits_onnx) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(digits_onnx.parent))
    body = b'{"data": [' + b",".join([b"[" + b",".join([b"1.0"] * 64) + b"]"] * 20) + b"]}"
    with socket.create_connection(("127.0.0.1", server.server.port), timeout=10) as s:
        s.sendall(
            b"POST /score HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        reply = b""
        while b'"probabilities"' not in reply:
            chunk = s.recv(65536)
            assert chunk
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 OK")
    huge = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    reply = _raw_exchange(server.server.port, huge, 1)
    assert reply.startswith(b"HTTP/1.1 431")
    assert b"request headers larger than 65536 bytes" in reply
    long_url = b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = _raw_exchange(server.server.port, long_url, 1)
    assert reply.startswith(b"HTTP/1.1 414")
    assert b"request URL longer than 65536 bytes" in reply
    assert httpx.get(server.url + "/v2/health/live").status_code == 200


def test_idle_and_half_sent_connections_are_closed(start_server, digits_onnx) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(digits_onnx.parent), keep_alive_s=0.3)
    with socket.create_connection(("127.0.0.1", server.server.port), timeout=10) as idle, \
            socket.create_connection(("127.0.0.1", server.server.port), timeout=10) as slow:
        slow.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert idle.recv(10) == b""  # closed by the server, not by a timeout here
        assert slow.recv(10) == b""
    assert httpx.get(server.url + "/v2/health/live").status_code == 200


def test_long_pipeline_behind_slow_requests_is_answered_in_order(start_server, slow_spec) -> None:  # type: ignore[no-untyped-def]
    server = start_server(slow_spec)
    n = 100
    payload = b"".join(
        b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\n"
        + f"x-request-id: p{i}\r\n\r\n".encode() + b'{"sleep_ms":2}'
        for i in range(n)
    )
    data = _raw_exchange(server.server.port, payload, n)
    ids = [line.split(b": ")[1] for line in data.split(b"\r\n") if line.startswith(b"x-request-id")]
    assert ids == [f"p{i}".encode() for i in range(n)]
