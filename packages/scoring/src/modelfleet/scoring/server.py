"""`ScoringServer`: the HTTP API of every scoring server (cloud container or device agent).

Routes: POST /score, GET /, /v2/health/live, /v2/health/ready, /v2/models/{name},
/swagger.json, /metrics, and POST /v2/repository/models/{name}/load (admin).
Fast models are scored inline on the event loop; slow ones in a thread pool
with a timeout and a bounded queue, so they never block health checks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from typing import Any

import orjson

from .auth import KeyRing
from .errors import ModelLoadError, RequestError, ScriptError
from .host import LoadedModel, ModelHost, ModelSpec
from .metrics import ScoringMetrics
from .protocol import HttpConnection, Request, render
from .runtimes.base import RawResponse, ScoreInput, decode_body, is_msgpack
from .settings import ServerSettings
from .tensors import v2_request_to_payload, v2_response

log = logging.getLogger("modelfleet.scoring.server")

JSON = "application/json"
MSGPACK = "application/msgpack"
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_HEALTH_EXEMPT = {"/", "/v2/health/live", "/v2/health/ready"}


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict") and hasattr(obj, "columns"):  # pandas DataFrame
        return obj.to_dict(orient="records")
    if hasattr(obj, "tolist"):  # numpy arrays orjson cannot take directly, pandas Series
        return obj.tolist()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket (OSError when the address is taken or invalid).

    Bound here rather than by the event loop: uvloop would start libuv's resolver
    thread pool (4 threads) just to parse a numeric address.
    """
    sock = socket.create_server(
        (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=2048
    )
    sock.setblocking(False)
    return sock


def _raw_response_problem(response: RawResponse) -> str | None:
    """Why a raw-mode response cannot go on the wire as it is (None: it can)."""
    if not 100 <= response.status <= 599:
        return f"an invalid HTTP status {response.status}"
    for name, value in response.headers:
        if not name or any(c in name for c in ":\r\n\0 ") or any(c in value for c in "\r\n\0"):
            return f"an invalid response header {name!r}: {value[:100]!r}"
        try:
            (name + value).encode("latin-1")
        except UnicodeEncodeError:
            return f"a response header that is not Latin-1 text: {name!r}"
    return None


def _timed(fn: Any, arg: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(arg)
    return result, time.perf_counter() - t0


class ScoringServer:
    """Serves a `ModelHost` over HTTP/1.1 on one port."""

    def __init__(self, host: ModelHost, settings: ServerSettings | None = None) -> None:
        self.host = host
        self.settings = settings or ServerSettings()
        self.keys = KeyRing(self.settings.keys_file)
        self.admin_keys = (
            KeyRing(self.settings.admin_key_file, single_token=True)
            if self.settings.admin_key_file
            else None
        )
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[HttpConnection] = set()
        self._pool = ThreadPoolExecutor(
            max_workers=self.settings.concurrency, thread_name_prefix="modelfleet-score"
        )
        self._slots: asyncio.Semaphore | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._pending = 0
        self._capacity = self.settings.concurrency + self.settings.queue_limit
        self._timeout = self.settings.scoring_timeout_ms / 1000.0
        self._id_prefix = os.urandom(4).hex()
        self._ids = count(1)
        # keyed by the model object itself: a retired version's id() is soon reused
        self._swagger_cache: tuple[LoadedModel, bytes] | None = None
        #: set by a `--workers N` worker: the admin load swaps every worker through
        #: the parent, answering (status, body); None: this process's host alone
        self.loader: Callable[[ModelSpec], Awaitable[tuple[int, dict[str, Any]]]] | None = None

    @property
    def pending(self) -> int:
        """Requests waiting for or running in the thread pool."""
        return self._pending

    @property
    def metrics(self) -> ScoringMetrics:
        return self.host.metrics

    # --- lifecycle ----------------------------------------------------------
    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on settings.host:settings.port (0 = a free port, see `.port`) or on `sock`."""
        loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.settings.concurrency)

        def factory() -> HttpConnection:
            return HttpConnection(
                self.handle, self.settings.max_body_bytes, self._connections, self._error_bytes
            )

        if sock is None:
            sock = listen_socket(self.settings.host, self.settings.port)
        self._server = await loop.create_server(factory, sock=sock, backlog=2048)
        self._sweeper = loop.create_task(self._close_idle_connections())
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("event=listening host=%s port=%d", self.settings.host, self.port)

    async def _close_idle_connections(self) -> None:
        """Close keep-alive connections idle longer than keep_alive_s (and half-sent requests)."""
        limit = self.settings.keep_alive_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(limit / 2, 5.0))
            cutoff = loop.time() - limit
            for conn in list(self._connections):
                if not conn.busy and conn.last_active < cutoff:
                    conn.close()

    async def stop(self, drain_s: float = 5.0) -> None:
        """Stop listening, let requests in progress finish (up to drain_s), close connections."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            self._server.close()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + drain_s
            while any(c.busy for c in self._connections) and loop.time() < deadline:
                await asyncio.sleep(0.01)
            for conn in list(self._connections):
                conn.close()
            await self._server.wait_closed()
            self._server = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    def set_keys(self, primary: str | None, secondary: str | None = None) -> None:
        """Replace the scoring keys on a running server."""
        self.keys.set_keys(primary, secondary)

    def reload_keys(self) -> None:
        """Re-read the keys files (SIGHUP)."""
        self.keys.reload()
        if self.admin_keys is not None:
            self.admin_keys.reload()

    # --- dispatch -----------------------------------------------------------
    def _request_id(self, headers: dict[str, str]) -> str:
        for name in ("x-request-id", "x-ms-request-id", "x-ms-client-request-id"):
            value = headers.get(name)
            if value and len(value) <= 200:
                return value
        return f"{self._id_prefix}-{next(self._ids):x}"

    def handle(self, req: Request) -> bytes | Awaitable[bytes]:
        rid = self._request_id(req.headers)
        if req.reject:
            return self._error(
                req, rid, req.reject,
                f"request body exceeds the limit of {self.settings.max_body_bytes} bytes",
            )
        path = req.path
        method = req.method
        if path == "/score":
            if method == "POST" or method == "GET":
                if not self._authorized(req):
                    return self._unauthorized(req, rid)
                return self._score(req, rid)
            return self._not_allowed(req, rid, "POST")
        if path in _HEALTH_EXEMPT:
            if method != "GET" and method != "HEAD":
                return self._not_allowed(req, rid, "GET")
            if path == "/v2/health/live":
                return self._json(req, rid, 200, {"live": True})
            ready = self.host.ready
            if path == "/":
                # what Azure ML clients and load balancers probe
                return render(
                    200 if ready else 503, b"Healthy" if ready else b"Not ready",
                    "text/plain", rid, close=not req.keep_alive,
                )
            return self._json(req, rid, 200 if ready else 503, {"ready": ready})
        if path.startswith("/v2/repository/models/") and path.endswith("/load"):
            if method != "POST":
                return self._not_allowed(req, rid, "POST")
            return self._admin_load(req, rid, path[len("/v2/repository/models/") : -len("/load")])
        if not self._authorized(req):
            return self._unauthorized(req, rid)
        if method == "POST" and path.startswith("/v2/models/") and path.endswith("/infer"):
            return self._v2_infer(req, rid, path[len("/v2/models/") : -len("/infer")])
        if method != "GET" and method != "HEAD":
            if path in {"/swagger.json", "/metrics"} or path.startswith("/v2/models/"):
                return self._not_allowed(req, rid, "GET")
            return self._error(req, rid, 404, f"no such endpoint: {method} {path}")
        if path == "/swagger.json":
            return self._swagger(req, rid)
        if path == "/metrics":
            active = self.host.active
            body = self.metrics.prometheus(self._pending, None if active is None else active.inline).encode()
            return render(200, body, "text/plain; version=0.0.4", rid, close=not req.keep_alive)
        if path.startswith("/v2/models/"):
            return self._model_metadata(req, rid, path[len("/v2/models/") :])
        if path == "/v2":
            return self._json(req, rid, 200, {"name": "modelfleet-scoring", "extensions": []})
        return self._error(req, rid, 404, f"no such endpoint: {method} {path}")

    # --- /score ---------------------------------------------------------------
    def _score(self, req: Request, rid: str) -> bytes | Awaitable[bytes]:
        started = time.perf_counter()
        model = self.host.acquire()
        if model is None:
            return self._finish_score(req, rid, started, 503, {"error": "no model loaded yet", "request_id": rid})
        if req.method == "GET" and not model.runtime.raw:
            model.release()
            return self._not_allowed(req, rid, "POST")
        inp = ScoreInput(
            req.body,
            req.headers.get("content-type", JSON),
            req.method,
            req.path,
            req.query,
            req.headers,
        )
        return self._run_model(req, rid, model, inp, started, None)

    def _run_model(
        self, req: Request, rid: str, model: LoadedModel, inp: ScoreInput, started: float,
        shape: Callable[[Any], Any] | None,
    ) -> bytes | Awaitable[bytes]:
        """Score on the loop or in the pool; `shape` turns the result into the response body."""
        if not model.inline:
            return self._score_pooled(req, rid, model, inp, started, shape)
        try:
            result = model.runtime.predict(inp)
            if shape is not None:
                result = shape(result)
        except Exception as exc:
            # a call that fails after a long time blocked the loop all the same
            self._observe_inline(model, started)
            return self._score_failed(req, rid, started, exc)
        finally:
            model.release()
        self._observe_inline(model, started)
        return self._render_result(req, rid, started, result, model)

    def _observe_inline(self, model: LoadedModel, started: float) -> None:
        elapsed = time.perf_counter() - started
        if model.observe_inline_call(elapsed):
            self.metrics.moved_to_pool += 1
            log.warning(
                "event=model_moved_to_pool name=%s version=%s latency_ms=%.1f reason=%r",
                model.name, model.version, elapsed * 1000,
                "slow inline calls blocked the event loop; scored in the thread pool from now on",
            )

    async def _score_pooled(
        self, req: Request, rid: str, model: LoadedModel, inp: ScoreInput, started: float,
        shape: Callable[[Any], Any] | None = None,
    ) -> bytes:
        if self._pending >= self._capacity:
            model.release()
            self.metrics.rejected += 1
            return self._finish_score(
                req, rid, started, 503,
                {"error": "server busy: too many requests in progress, retry shortly", "request_id": rid},
                extra=[("retry-after", "1")],
            )
        self._pending += 1
        slots = self._slots
        assert slots is not None
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(slots.acquire(), self._timeout)
        except TimeoutError:
            self._pending -= 1
            model.release()
            return self._timed_out(req, rid, started)
        future = loop.run_in_executor(self._pool, _timed, model.runtime.predict, inp)

        def done(fut: asyncio.Future[Any]) -> None:
            # the slot stays taken until the thread really finishes, even after a 504
            slots.release()
            self._pending -= 1
            model.release()
            if not fut.cancelled():
                fut.exception()

        future.add_done_callback(done)
        remaining = self._timeout - (time.perf_counter() - started)
        try:
            result, run_s = await asyncio.wait_for(asyncio.shield(future), max(remaining, 0.0))
            if shape is not None:
                result = shape(result)
        except TimeoutError:
            return self._timed_out(req, rid, started)
        except Exception as exc:
            return self._score_failed(req, rid, started, exc)
        if model.observe_pool_call(run_s):
            log.info("event=model_moved_inline name=%s version=%s", model.name, model.version)
        return self._render_result(req, rid, started, result, model)

    def _timed_out(self, req: Request, rid: str, started: float) -> bytes:
        return self._finish_score(
            req, rid, started, 504,
            {"error": f"scoring timed out after {self.settings.scoring_timeout_ms} ms", "request_id": rid},
        )

    def _score_failed(self, req: Request, rid: str, started: float, exc: Exception) -> bytes:
        if isinstance(exc, RequestError):
            return self._finish_score(req, rid, started, exc.status, {"error": exc.message, "request_id": rid})
        if isinstance(exc, ScriptError):
            log.error("event=run_failed request_id=%s error=%r", rid, str(exc), exc_info=exc.__cause__)
            message = str(exc)
        else:
            log.error("event=score_failed request_id=%s", rid, exc_info=exc)
            message = f"scoring failed: {type(exc).__name__}: {exc}"
        # the header Azure ML's server sets when run() fails; some clients look for it
        return self._finish_score(
            req, rid, started, 500, {"error": message, "request_id": rid},
            extra=[("x-ms-run-function-failed", "True")],
        )

    def _render_result(
        self, req: Request, rid: str, started: float, result: Any, model: LoadedModel
    ) -> bytes:
        extra = [("x-model-version", model.version)]
        if type(result) is RawResponse:
            problem = _raw_response_problem(result)
            if problem is not None:
                # e.g. a script copying a query parameter (%0d%0a decodes to CRLF) into a header
                return self._finish_score(
                    req, rid, started, 500, {"error": f"run() returned {problem}", "request_id": rid}
                )
            headers = extra + [
                (k, v) for k, v in result.headers if k.lower() not in {"content-length", "content-type", "connection"}
            ]
            ctype = next((v for k, v in result.headers if k.lower() == "content-type"), "application/octet-stream")
            self.metrics.observe(result.status, time.perf_counter() - started)
            return render(result.status, result.body, ctype, rid, headers, close=not req.keep_alive)
        try:
            if self._wants_msgpack(req):
                import msgpack

                body = msgpack.packb(result, default=_json_default, use_bin_type=True)
                ctype = MSGPACK
            else:
                body = orjson.dumps(result, default=_json_default, option=_JSON_OPTS)
                ctype = JSON
        except (TypeError, ValueError, OverflowError) as exc:
            return self._finish_score(
                req, rid, started, 500,
                {"error": f"run() returned a value that cannot be serialised: {exc}", "request_id": rid},
            )
        self.metrics.observe(200, time.perf_counter() - started)
        return render(200, body, ctype, rid, extra, close=not req.keep_alive)

    def _finish_score(
        self, req: Request, rid: str, started: float, status: int, payload: dict[str, Any],
        extra: list[tuple[str, str]] | None = None,
    ) -> bytes:
        self.metrics.observe(status, time.perf_counter() - started)
        return self._json(req, rid, status, payload, extra)

    @staticmethod
    def _wants_msgpack(req: Request) -> bool:
        accept = req.headers.get("accept")
        if accept is not None and "msgpack" in accept:
            return True
        if accept is None or accept.startswith("*/*"):
            return is_msgpack(req.headers.get("content-type", ""))
        return False

    # --- admin: hot-swap over HTTP -------------------------------------------
    def _admin_load(self, req: Request, rid: str, name: str) -> bytes | Awaitable[bytes]:
        if self.admin_keys is None:
            return self._error(req, rid, 404, "the model repository endpoint is disabled; start the server with --admin-key-file")
        if not self.admin_keys.check(req.headers.get("authorization")):
            return self._unauthorized(req, rid, "missing or invalid admin key: send Authorization: Bearer <admin key>")
        try:
            body = orjson.loads(req.body or b"{}")
        except orjson.JSONDecodeError as exc:
            return self._error(req, rid, 400, f"malformed JSON body: {exc}")
        if not isinstance(body, dict):
            return self._error(req, rid, 400, 'body must be a JSON object: {"model_dir": ..., "entry_script": ..., "version": ...}')
        model_dir = body.get("model_dir")
        if not isinstance(model_dir, str) or not model_dir:
            return self._error(req, rid, 400, 'field "model_dir" is required (a path as the server sees it)')
        entry = body.get("entry_script")
        if entry is not None and not isinstance(entry, str):
            return self._error(req, rid, 400, 'field "entry_script" must be a string or null')
        version = body.get("version", "1")
        if not isinstance(version, str | int) or isinstance(version, bool):
            return self._error(req, rid, 400, 'field "version" must be a string')
        from pathlib import Path

        spec = ModelSpec(Path(model_dir), entry or None, name=name, version=str(version))
        return self._admin_load_async(req, rid, spec)

    async def _admin_load_async(self, req: Request, rid: str, spec: ModelSpec) -> bytes:
        if self.loader is not None:
            status, payload = await self.loader(spec)
            if status != 200:
                payload = {**payload, "request_id": rid}
            return self._json(req, rid, status, payload)
        try:
            model = await self.host.aload(spec)
        except ModelLoadError as exc:
            return self._json(req, rid, 422, {"error": exc.reason, "stage": exc.stage, "request_id": rid})
        return self._json(req, rid, 200, {"name": model.name, "version": model.version})

    # --- metadata -------------------------------------------------------------
    def _swagger(self, req: Request, rid: str) -> bytes:
        model = self.host.active
        if model is None:
            return self._error(req, rid, 503, "no model loaded yet")
        cached = self._swagger_cache
        if cached is None or cached[0] is not model:
            from .openapi import build_openapi

            doc = build_openapi(model, auth=self.keys.enabled)
            cached = (model, orjson.dumps(doc, default=_json_default, option=_JSON_OPTS))
            self._swagger_cache = cached
        return render(200, cached[1], JSON, rid, close=not req.keep_alive)

    def _model_metadata(self, req: Request, rid: str, rest: str) -> bytes:
        model = self.host.active
        name, _, tail = rest.partition("/")
        if model is None or name != model.name:
            return self._error(req, rid, 404, f"unknown model {name!r}")
        if tail == "ready":
            return self._json(req, rid, 200, {"name": model.name, "ready": True})
        if tail and tail != f"versions/{model.version}":
            return self._error(req, rid, 404, f"no such endpoint: GET {req.path}")
        sig = model.signature
        return self._json(req, rid, 200, {
            "name": model.name,
            "versions": [model.version],
            "platform": model.runtime.platform,
            # where requests are scored: "inline" (on the event loop) or "thread_pool";
            # moved_to_pool: it ran inline until slow calls moved it
            "parameters": {
                "placement": "inline" if model.inline else "thread_pool",
                "moved_to_pool": model.pool_only,
            },
            "inputs": [{"name": t.name, "datatype": t.v2_datatype, "shape": list(t.shape)} for t in sig.inputs],
            "outputs": [{"name": t.name, "datatype": t.v2_datatype, "shape": list(t.shape)} for t in sig.outputs],
        })

    def _v2_infer(self, req: Request, rid: str, rest: str) -> bytes | Awaitable[bytes]:
        """Open Inference Protocol v2 inference, for models with a tensor signature."""
        started = time.perf_counter()
        name, _, version_part = rest.partition("/versions/")
        model = self.host.acquire()
        if model is None:
            return self._finish_score(req, rid, started, 503, {"error": "no model loaded yet", "request_id": rid})
        if name != model.name or (version_part and version_part != model.version):
            model.release()
            return self._error(req, rid, 404, f"unknown model {rest!r}")
        inputs = model.signature.inputs
        if not inputs:
            model.release()
            return self._error(
                req, rid, 400, "this model has no tensor signature (an entry script); use POST /score"
            )
        try:
            body = decode_body(req.body, req.headers.get("content-type", JSON))
            payload = v2_request_to_payload(body, inputs)
        except RequestError as exc:
            model.release()
            return self._finish_score(req, rid, started, exc.status, {"error": exc.message, "request_id": rid})
        inp = ScoreInput(b"", decoded=payload, is_decoded=True)
        request_id = body.get("id") if isinstance(body, dict) else None

        def shape(result: Any) -> Any:
            return v2_response(model.name, model.version, result, model.signature.outputs, request_id)

        return self._run_model(req, rid, model, inp, started, shape)

    # --- helpers ----------------------------------------------------------------
    def _authorized(self, req: Request) -> bool:
        return not self.keys.enabled or self.keys.check(req.headers.get("authorization"))

    def _unauthorized(self, req: Request, rid: str, message: str | None = None) -> bytes:
        return self._json(
            req, rid, 401,
            {"error": message or "missing or invalid key: send Authorization: Bearer <key>", "request_id": rid},
            [("www-authenticate", "Bearer")],
        )

    def _not_allowed(self, req: Request, rid: str, allow: str) -> bytes:
        return self._json(
            req, rid, 405,
            {"error": f"method {req.method} not allowed on {req.path}; use {allow}", "request_id": rid},
            [("allow", allow)],
        )

    def _error(self, req: Request, rid: str, status: int, message: str) -> bytes:
        return self._json(req, rid, status, {"error": message, "request_id": rid})

    def _error_bytes(self, status: int, message: str) -> bytes:
        rid = f"{self._id_prefix}-{next(self._ids):x}"
        return render(status, orjson.dumps({"error": message, "request_id": rid}), JSON, rid, close=True)

    @staticmethod
    def _json(
        req: Request, rid: str, status: int, payload: Any, extra: list[tuple[str, str]] | None = None
    ) -> bytes:
        body = orjson.dumps(payload, default=_json_default, option=_JSON_OPTS)
        return render(status, body, JSON, rid, extra, close=not req.keep_alive)
