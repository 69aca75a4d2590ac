"""The registry's HTTP artifact server (contract section 3): devices download model bytes here.

A threaded stdlib HTTP server: artifact downloads are plain file streaming,
bounded by the disk and the network, and each download gets its own thread.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from modelfleet.deployer.errors import DeployerError, ModelNotFoundError
from modelfleet.deployer.registry.store import Registry

log = logging.getLogger(__name__)

_ARTIFACT = re.compile(r"^/v1/artifacts/([0-9a-f]{64})$")
_MODEL = re.compile(r"^/v1/models/([^/]+)/([^/]+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 1 << 16


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """(start, end inclusive), None for "serve everything", "unsatisfiable"."""
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # multiple or malformed ranges: RFC 9110 lets us ignore the header
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("artifact-server %s", format % args)

    # -- helpers --------------------------------------------------------------

    def _send_json(self, status: int, body: dict[str, Any], head: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _authorised(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip(), token):
            return True
        self._send_json(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"})
        return False

    # -- routes ---------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send_json(HTTPStatus.OK, {"status": "ok"}, head)
            return
        if (m := _ARTIFACT.match(path)) is not None:
            if self._authorised():
                self._artifact(m.group(1), head)
            return
        if (m := _MODEL.match(path)) is not None:
            if self._authorised():
                self._model(m.group(1), m.group(2), head)
            return
        self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no route for {path}"}, head)

    def _model(self, name: str, version: str, head: bool) -> None:
        if not version.isdigit():
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"invalid version {version!r}"}, head)
            return
        try:
            model = self.server.registry.get_model(name, int(version))
        except ModelNotFoundError as exc:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": str(exc)}, head)
            return
        except DeployerError as exc:  # the database is locked or unreadable: say so, keep serving
            log.warning("artifact-server model lookup failed reason=%r", str(exc))
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)}, head)
            return
        ref = self.server.registry.model_ref(model, self.server.public_url)
        self._send_json(HTTPStatus.OK, ref.to_dict(), head)

    def _artifact(self, digest: str, head: bool) -> None:
        path = self.server.registry.blobs.path(digest)
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no artifact {digest}"}, head)
            return
        with fh:
            size = path.stat().st_size
            wanted = _parse_range(self.headers.get("Range", ""), size) if "Range" in self.headers else None
            if wanted == "unsatisfiable":
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if isinstance(wanted, tuple):
                start, end = wanted
                self.send_response(HTTPStatus.PARTIAL_CONTENT)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                start, end = 0, size - 1
                self.send_response(HTTPStatus.OK)
            length = end - start + 1
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("X-Content-SHA256", digest)
            self.send_header("ETag", f'"{digest}"')
            self.end_headers()
            if head or length <= 0:
                return
            fh.seek(start)
            remaining = length
            try:
                while remaining > 0:
                    chunk = fh.read(min(_CHUNK, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                # A device that drops mid-download resumes later with a Range request.
                return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], registry: Registry, token: str | None) -> None:
        super().__init__(address, _Handler)
        self.registry = registry
        self.token = token
        self.public_url = ""


class ArtifactServer:
    """The artifact server as a Python API: start on a (free) port in a thread, stop.

    >>> with ArtifactServer(Registry(), token="t") as server:
    ...     server.url  # http://127.0.0.1:PORT
    """

    def __init__(
        self,
        registry: Registry,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        public_url: str | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        self.token = token if token is not None else secrets.token_urlsafe(24)
        self._public_url = public_url
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise DeployerError("the artifact server is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        if self._public_url:
            return self._public_url.rstrip("/")
        host = self.host if self.host not in ("0.0.0.0", "") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def start(self) -> ArtifactServer:
        try:
            server = _Server((self.host, self.requested_port), self.registry, self.token)
        except OSError as exc:
            raise DeployerError(
                f"cannot listen on {self.host}:{self.requested_port}: {exc.strerror or exc}",
                hint="pick another --port (0 picks a free one)",
            ) from exc
        self._server = server
        server.public_url = self.url
        self._thread = threading.Thread(
            target=server.serve_forever, name="artifact-server", daemon=True
        )
        self._thread.start()
        log.info("artifact server listening url=%s", self.url)
        return self

    def serve_forever(self) -> None:
        """Block until interrupted (the CLI's `registry serve`)."""
        if self._thread is None:
            self.start()
        assert self._thread is not None
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        finally:
            self.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> ArtifactServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["ArtifactServer"]
