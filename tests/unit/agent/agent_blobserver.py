"""A small blob server (helper module) for the model store's tests: Range requests, a bearer token, and a
switch that cuts the connection after N bytes (a link dropping mid-download), and one that stalls after N
bytes (a server that stops sending but keeps the connection open)."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from modelfleet.agent.modelref import ModelVersionRef


@dataclass
class BlobServer:
    blobs: dict[str, bytes] = field(default_factory=dict)
    token: str = "t0ken"
    cut_after: int | None = None  # close the next response after this many body bytes
    served: int = 0  # body bytes sent, in total
    ranges: list[str | None] = field(default_factory=list)
    stall_after: int | None = None  # send this many body bytes of the next response, then go silent
    release: threading.Event = field(default_factory=threading.Event)  # ends a stall
    port: int = 0
    scheme: str = "http"  # "https" when the server's socket is wrapped in TLS

    def add(self, data: bytes, *, name: str = "m", version: int = 1, **extra: Any) -> ModelVersionRef:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        return ModelVersionRef(
            name=name, version=version, url=f"{self.scheme}://127.0.0.1:{self.port}/v1/artifacts/{sha}",
            sha256=sha, size=len(data), **extra,
        )


def make_handler(state: BlobServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {state.token}":
                self.send_error(401, "token required")
                return
            data = state.blobs.get(self.path.rsplit("/", 1)[-1])
            if data is None:
                self.send_error(404, "no such blob")
                return
            rng = self.headers.get("Range")
            state.ranges.append(rng)
            start = 0
            if rng:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if state.cut_after is not None:
                body, state.cut_after = body[: state.cut_after], None
                self.close_connection = True
            if state.stall_after is not None:
                head, state.stall_after = body[: state.stall_after], None
                self.wfile.write(head)
                self.wfile.flush()
                state.served += len(head)
                state.release.wait(60)
                self.close_connection = True
                return
            self.wfile.write(body)
            state.served += len(body)

    return Handler


