"""Fixtures for the agent's unit tests (the blob server lives in agent_blobserver.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest
from agent_blobserver import BlobServer, make_handler  # type: ignore[import-not-found]


@pytest.fixture
def blob_server() -> Iterator[BlobServer]:
    state = BlobServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    state.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
