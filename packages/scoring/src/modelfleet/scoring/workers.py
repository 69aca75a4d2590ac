"""`serve --workers N`: a parent process supervises N forked workers and swaps them together.

The workers share one listening socket, so an admin load request reaches one
of them. That worker hands it to the parent over its control socket (one unix
socketpair per worker, newline-delimited JSON), and the parent runs the swap
in two phases across every ready worker:

1. prepare: each worker loads and warms the new version beside the old one
   (`ModelHost.prepare`) and answers ok or its refusal;
2. commit: only when all said ok, each switches (`ModelHost.commit`); on any
   refusal (or a worker exiting meanwhile) all discard the candidate instead.

The admin request is answered only after every worker acknowledged its commit,
so a client that saw the 200 never gets the old version again. A worker that
dies after it was ready is forked again on the committed version; one that
fails before it was ever ready stops the service (a model that does not load
would only crash again). The parent never accepts connections and does no
per-request work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import selectors
import signal
import socket
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from itertools import count
from pathlib import Path
from typing import Any

import orjson

from .errors import ModelLoadError
from .host import Candidate, ModelHost, ModelSpec, off_loop
from .settings import ServerSettings

log = logging.getLogger("modelfleet.scoring.workers")

#: what a worker runs after the fork: (settings, listening socket, control socket) -> exit code
WorkerMain = Callable[[ServerSettings, socket.socket, socket.socket], int]
_CLEAN_EXIT = (0, -signal.SIGTERM, -signal.SIGINT)
#: the signals the supervisor handles (and a worker resets)
_HANDLED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


def spec_to_wire(spec: ModelSpec) -> dict[str, Any]:
    return {
        "model_dir": str(spec.model_dir),
        "entry_script": None if spec.entry_script is None else str(spec.entry_script),
        "name": spec.name,
        "version": spec.version,
    }


def spec_from_wire(data: dict[str, Any]) -> ModelSpec:
    return ModelSpec(Path(data["model_dir"]), data["entry_script"], name=data["name"], version=data["version"])


@dataclass
class _Worker:
    pid: int
    conn: socket.socket
    ready: bool = False
    buf: bytes = b""


@dataclass
class _Swap:
    id: int
    origin: int  # pid of the worker holding the admin request
    request: int  # that worker's id for the request
    spec: dict[str, Any]
    participants: set[int]
    phase: str = "prepare"  # then "commit"
    waiting: set[int] = field(default_factory=set)  # who has not answered this phase yet


class Supervisor:
    """The parent of `--workers N`: forks, restarts, forwards signals, coordinates swaps."""

    def __init__(self, settings: ServerSettings, sock: socket.socket, worker_main: WorkerMain) -> None:
        # the committed version's settings: what a (re)started worker loads
        self.settings = settings
        self.sock = sock
        self.worker_main = worker_main
        self.workers: dict[int, _Worker] = {}
        self.selector = selectors.DefaultSelector()
        self.queue: deque[tuple[int, int, dict[str, Any]]] = deque()
        self.swap: _Swap | None = None
        self.stopping = False
        # signals received and not yet passed on to the workers (see _on_signal)
        self._signals: list[int] = []
        self.worst = 0
        self._swap_ids = count(1)
        self._wake_r, self._wake_w = os.pipe()

    # --- process management ----------------------------------------------------
    def run(self) -> int:
        """Fork the workers and supervise them until they all exited; the exit code."""
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # signals only set flags (Python runs handlers between bytecodes); the
        # wakeup fd makes select() return so the loop acts on them at once
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            for _ in range(self.settings.workers):
                self._spawn()
            while self.workers:
                self._pass_signals_on()
                for key, _ in self.selector.select():
                    if key.data is None:
                        with suppress(OSError):
                            while os.read(self._wake_r, 4096):
                                pass
                    else:
                        self._read(key.data)
                self._reap()
                self._next_swap()
        finally:
            signal.set_wakeup_fd(-1)
            self.selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self.sock.close()
        return self.worst

    def _spawn(self) -> None:
        if self.stopping:
            return  # a stop that came while the workers were (re)started: fork no more
        parent_end, child_end = socket.socketpair()
        # Blocked across fork so that the child never runs the parent's handlers:
        # a signal sent to it before it reset them waits, then takes its default.
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
            parent_end.close()
            child_end.close()
            raise
        if pid == 0:
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                # a keys reload (SIGHUP) while the model loads must not kill the worker;
                # its event loop installs the real handler
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
                # the parent's ends: only the parent may hold them (EOF tells a worker it is gone)
                parent_end.close()
                for other in self.workers.values():
                    other.conn.close()
                self.selector.close()
                os.close(self._wake_r)
                os.close(self._wake_w)
                code = self.worker_main(self.settings, self.sock, child_end)
            except BaseException:  # os._exit below would swallow the traceback
                log.exception("event=worker_failed")
            finally:
                os._exit(code)
        try:
            child_end.close()
            self.workers[pid] = _Worker(pid, parent_end)
            self.selector.register(parent_end, selectors.EVENT_READ, self.workers[pid])
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        log.info("event=worker_started pid=%d version=%s", pid, self.settings.model_version)

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Only notes it: a handler may run anywhere in the loop, e.g. in _spawn
        # between the fork and the new worker's entry in self.workers, which a
        # kill from here would miss. The loop passes it on to every worker.
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        self._signals.append(signum)

    def _pass_signals_on(self) -> None:
        while self._signals:
            self._forward(self._signals.pop(0))

    def _forward(self, signum: int) -> None:
        for pid in list(self.workers):
            with suppress(OSError):
                os.kill(pid, signum)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._exited(pid, os.waitstatus_to_exitcode(status))

    def _exited(self, pid: int, code: int) -> None:
        worker = self.workers.pop(pid, None)
        if worker is None:
            return
        with suppress(KeyError, ValueError):
            self.selector.unregister(worker.conn)
        worker.conn.close()
        self._left_swap(pid, code)
        if self.stopping:
            if code not in _CLEAN_EXIT:
                self.worst = self.worst or (code if code > 0 else 1)
            return
        if not worker.ready:
            # it never served: the model (or the machine) will not let it start
            log.error("event=worker_failed_to_start pid=%d code=%d", pid, code)
            self.worst = self.worst or (code if code > 0 else 1)
            self.stopping = True
            self._forward(signal.SIGTERM)
            return
        log.warning("event=worker_exited pid=%d code=%d action=restart version=%s", pid, code,
                    self.settings.model_version)
        self._spawn()

    # --- control messages -----------------------------------------------------
    def _read(self, worker: _Worker) -> None:
        try:
            data = worker.conn.recv(65536)
        except OSError:
            data = b""
        if not data:  # the worker is exiting; _reap() cleans up
            with suppress(KeyError, ValueError):
                self.selector.unregister(worker.conn)
            return
        worker.buf += data
        while b"\n" in worker.buf:
            line, worker.buf = worker.buf.split(b"\n", 1)
            self._message(worker, orjson.loads(line))

    def _send(self, pid: int, msg: dict[str, Any]) -> None:
        worker = self.workers.get(pid)
        if worker is None:
            return
        with suppress(OSError):  # it is exiting; _reap() handles it
            worker.conn.sendall(orjson.dumps(msg) + b"\n")

    def _message(self, worker: _Worker, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "ready":
            worker.ready = True
        elif op == "load":
            self.queue.append((worker.pid, int(msg["id"]), msg["spec"]))
            log.info("event=swap_queued version=%s queued=%d busy=%s",
                     msg["spec"]["version"], len(self.queue), self.swap is not None)
        elif op in ("prepared", "committed"):
            swap = self.swap
            if swap is None or msg.get("swap") != swap.id or worker.pid not in swap.waiting:
                return  # an answer to a swap already refused
            if op == "prepared" and swap.phase == "prepare":
                if not msg["ok"]:
                    self._refuse(swap, str(msg["stage"]), f"worker {worker.pid}: {msg['reason']}")
                    return
                swap.waiting.discard(worker.pid)
                if not swap.waiting:
                    self._commit(swap)
            elif op == "committed" and swap.phase == "commit":
                swap.waiting.discard(worker.pid)
                self._finish_if_done(swap)

    # --- the two-phase swap -------------------------------------------------------
    def _next_swap(self) -> None:
        if self.stopping:
            # answered now: the worker holding the request waits for it while it drains
            while self.queue:
                origin, request, spec = self.queue.popleft()
                log.info("event=swap_dropped version=%s reason=stopping", spec["version"])
                self._send(origin, {
                    "op": "result", "id": request, "status": 503,
                    "body": {"error": "the server is stopping; this load was not started"},
                })
            return
        if self.swap is not None or not self.queue:
            return
        if not all(w.ready for w in self.workers.values()):
            return  # a worker is (re)starting on the committed version: wait for it
        origin, request, spec = self.queue.popleft()
        swap = _Swap(next(self._swap_ids), origin, request, spec, set(self.workers))
        swap.waiting = set(swap.participants)
        self.swap = swap
        log.info("event=swap_prepare swap=%d version=%s workers=%d", swap.id, spec["version"], len(swap.participants))
        for pid in swap.participants:
            self._send(pid, {"op": "prepare", "swap": swap.id, "spec": spec})

    def _commit(self, swap: _Swap) -> None:
        spec = swap.spec
        # decided: from here a restarted worker starts on the new version
        self.settings = replace(
            self.settings, model_dir=Path(spec["model_dir"]), entry_script=spec["entry_script"],
            model_name=spec["name"], model_version=spec["version"],
        )
        swap.phase = "commit"
        swap.waiting = set(swap.participants)
        for pid in swap.participants:
            self._send(pid, {"op": "commit", "swap": swap.id})
        self._finish_if_done(swap)

    def _finish_if_done(self, swap: _Swap) -> None:
        if swap.phase != "commit" or swap.waiting:
            return
        self.swap = None
        log.info("event=swap_done swap=%d version=%s", swap.id, swap.spec["version"])
        self._send(swap.origin, {
            "op": "result", "id": swap.request, "status": 200,
            "body": {"name": swap.spec["name"], "version": swap.spec["version"]},
        })

    def _refuse(self, swap: _Swap, stage: str, reason: str) -> None:
        self.swap = None
        log.warning("event=swap_refused swap=%d version=%s stage=%s reason=%r",
                    swap.id, swap.spec["version"], stage, reason)
        for pid in swap.participants:
            self._send(pid, {"op": "abort", "swap": swap.id})
        self._send(swap.origin, {
            "op": "result", "id": swap.request, "status": 422, "body": {"error": reason, "stage": stage},
        })

    def _left_swap(self, pid: int, code: int) -> None:
        swap = self.swap
        if swap is None or pid not in swap.participants:
            return
        swap.participants.discard(pid)
        swap.waiting.discard(pid)
        if swap.phase == "prepare":
            self._refuse(swap, "load", f"worker {pid} exited during the load (exit code {code})")
        else:
            self._finish_if_done(swap)


class ControlChannel:
    """A worker's end of its control socket: hands admin loads to the parent, runs its phases."""

    def __init__(self, host: ModelHost, sock: socket.socket, on_parent_gone: Callable[[], None]) -> None:
        self.host = host
        self.sock = sock
        self.on_parent_gone = on_parent_gone
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        # prepare/commit/abort, run in order by _run_phases; None: the parent is gone
        self._phases: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._phase_task: asyncio.Task[None] | None = None
        self._ids = count(1)
        self._pending: dict[int, asyncio.Future[tuple[int, dict[str, Any]]]] = {}

    async def start(self) -> None:
        """Connect the streams and tell the parent this worker serves (call once listening)."""
        reader, self._writer = await asyncio.open_unix_connection(sock=self.sock)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._serve(reader))
        self._phase_task = loop.create_task(self._run_phases())
        self._send({"op": "ready"})

    async def load(self, spec: ModelSpec) -> tuple[int, dict[str, Any]]:
        """Swap every worker to `spec`: (200, {name, version}) or (422, {error, stage})."""
        request = next(self._ids)
        future: asyncio.Future[tuple[int, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._pending[request] = future
        self._send({"op": "load", "id": request, "spec": spec_to_wire(spec)})
        return await future

    def close(self) -> None:
        for task in (self._task, self._phase_task):
            if task is not None:
                task.cancel()
        if self._writer is not None:
            self._writer.close()

    def _send(self, msg: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(orjson.dumps(msg) + b"\n")

    async def _serve(self, reader: asyncio.StreamReader) -> None:
        # Results are handled as they come; the phases go to _run_phases, so that
        # an answer (e.g. the 503 of a load dropped at stop) never waits behind a
        # prepare that is still loading.
        while True:
            line = await reader.readline()
            if not line:
                break
            msg = orjson.loads(line)
            if msg["op"] == "result":
                future = self._pending.pop(int(msg["id"]), None)
                if future is not None and not future.done():
                    future.set_result((int(msg["status"]), msg["body"]))
            else:
                self._phases.put_nowait(msg)
        # EOF: the parent is gone; nobody would restart or swap this worker any more
        self._phases.put_nowait(None)
        for future in self._pending.values():
            if not future.done():
                future.set_result((503, {"error": "the server is stopping"}))
        self._pending.clear()
        log.warning("event=parent_gone action=stop")
        self.on_parent_gone()

    async def _run_phases(self) -> None:
        # one phase at a time: an abort or commit runs only after its prepare finished
        candidate: tuple[int, Candidate] | None = None
        while (msg := await self._phases.get()) is not None:
            op = msg["op"]
            if op == "prepare":
                if candidate is not None:  # cannot happen; never leak a loaded model
                    self.host.discard(candidate[1])
                    candidate = None
                try:
                    prepared = await off_loop(self.host.prepare, spec_from_wire(msg["spec"]))
                except ModelLoadError as exc:
                    self._send({"op": "prepared", "swap": msg["swap"], "ok": False,
                                "stage": exc.stage, "reason": exc.reason})
                else:
                    candidate = (msg["swap"], prepared)
                    self._send({"op": "prepared", "swap": msg["swap"], "ok": True})
            elif op in ("commit", "abort"):
                if candidate is not None and candidate[0] == msg["swap"]:
                    if op == "commit":
                        self.host.commit(candidate[1])
                    else:
                        self.host.discard(candidate[1])
                    candidate = None
                if op == "commit":
                    self._send({"op": "committed", "swap": msg["swap"]})
        if candidate is not None:
            self.host.discard(candidate[1])
