"""Run a scoring server process (or N worker processes sharing one listening socket)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import threading

from .auth import KeyRing
from .errors import ConfigError, ModelLoadError
from .footprint import trim_heap
from .host import ModelHost, ModelSpec
from .server import ScoringServer, listen_socket
from .settings import ServerSettings

log = logging.getLogger("modelfleet.scoring")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s pid=%(process)d %(message)s",
    )


def serve(settings: ServerSettings) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    if settings.model_dir is None:
        log.error("event=config_error field=model_dir reason=%r", "required (--model-dir or MODELFLEET_MODEL_DIR)")
        return 2
    # what settings alone can get wrong fails here, before any thread or fork: one
    # ConfigError line from the CLI, not N silent workers nor an abort at exit while
    # the pre-import thread is inside onnxruntime
    KeyRing(settings.keys_file)
    if settings.admin_key_file is not None:
        KeyRing(settings.admin_key_file, single_token=True)
    sock = _listen(settings)
    if settings.workers == 1:
        # not before a fork: OpenBLAS and onnxruntime threads do not survive one
        _preimport(settings)
        return _run_worker(settings, sock, shared=False)
    log.info("event=workers count=%d port=%d", settings.workers, sock.getsockname()[1])
    from .workers import Supervisor

    # the model loads after fork in each worker: onnxruntime threads do not survive one
    return Supervisor(settings, sock, _run_shared_worker).run()


def _run_shared_worker(settings: ServerSettings, sock: socket.socket, control: socket.socket) -> int:
    return _run_worker(settings, sock, shared=True, control=control)


def _listen(settings: ServerSettings) -> socket.socket:
    """The listening socket, or a ConfigError naming the address (port taken, no such host)."""
    try:
        return listen_socket(settings.host, settings.port)
    except OSError as exc:
        field = "port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "host"
        # create_server appends the address to strerror; a resolver error (gaierror) has errno < 0
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else (exc.strerror or str(exc))
        raise ConfigError(field, f"cannot listen on {settings.host}:{settings.port}: {reason}") from None


async def _load_in_passing_thread(host: ModelHost, spec: ModelSpec) -> None:
    """The first load, on a thread that then exits (its stack and arena go back to the OS).

    The loop's default executor would keep an idle thread for the process's life.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def work() -> None:
        try:
            host.load(spec)
        except BaseException as exc:
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, None)

    threading.Thread(target=work, name="modelfleet-load", daemon=True).start()
    await done


def _preimport(settings: ServerSettings) -> None:
    """Import the model's runtime library on a side thread while the loop and socket come up.

    Importing NumPy and onnxruntime is most of the start-up time; overlapping it
    with the rest saves a little. Only the library this model needs is imported
    (a TFLite device must not pay onnxruntime's memory).
    """
    from .host import find_model_file

    def work() -> None:
        try:
            if settings.entry_script or settings.model_dir is None:
                import numpy  # noqa: F401  (nearly every score.py needs it)

                return
            suffix = find_model_file(settings.model_dir).suffix.lower()
            if suffix == ".onnx":
                import onnxruntime  # noqa: F401
            else:
                from .runtimes.tflite import interpreter_class

                interpreter_class()
        except Exception:  # the real load reports any problem
            pass

    threading.Thread(target=work, name="modelfleet-preimport", daemon=True).start()


def _run_worker(
    settings: ServerSettings, sock: socket.socket, *, shared: bool, control: socket.socket | None = None
) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional (Windows); asyncio works, only slower
        pass
    return asyncio.run(_main(settings, sock, shared, control))


async def _main(
    settings: ServerSettings, sock: socket.socket, shared: bool, control_sock: socket.socket | None
) -> int:
    assert settings.model_dir is not None
    host = ModelHost(inline_threshold_ms=settings.inline_threshold_ms, load_timeout_s=settings.load_timeout_s)
    server = ScoringServer(host, settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_keys)
    spec = ModelSpec(
        settings.model_dir, settings.entry_script, name=settings.model_name, version=settings.model_version
    )
    # One process listens first, so liveness answers while init() runs. Workers
    # sharing a socket load first: a worker accepts connections only once ready.
    if not shared:
        await server.start(sock)
    try:
        await _load_in_passing_thread(host, spec)
    except ModelLoadError as exc:
        log.error("event=startup_failed stage=%s reason=%r", exc.stage, exc.reason)
        await server.stop()
        return 1
    if shared:
        await server.start(sock)
    control = None
    if control_sock is not None:
        from .workers import ControlChannel

        # an admin load goes to the parent, which swaps every worker (workers.py)
        control = ControlChannel(host, control_sock, stop.set)
        server.loader = control.load
        await control.start()
    trim_heap()  # memory freed while loading (model bytes, parse buffers) back to the OS
    log.info("event=ready port=%d model=%s version=%s", server.port, spec.name, spec.version)
    await stop.wait()
    await server.stop()
    if control is not None:
        control.close()
    host.unload()
    return 0
