"""An HTTP(S) GET whose connection another thread can cut: a stalled download stops on cancel.

A thread blocked in a socket read ignores a cancel flag until the read
returns, which with a stalled server is only after `store.timeout_s`. urllib
is given connection classes that hand their socket to a `LinkCutter`; when
the cancel event is set (a newer desired state, or SIGTERM) the cutter shuts
the sockets down, which wakes the blocked read at once with end-of-file.
The caller then sees the cancel event set and stops, keeping its bytes.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import urllib.request
from typing import Any

#: how often the cutter looks at the cancel event: the bound on how late a cancel takes effect
POLL_S = 0.1


class LinkCutter:
    """Watches a cancel event while a download runs and shuts down its sockets when it is set."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._cut = False
        self._thread = threading.Thread(target=self._watch, name="download-cancel", daemon=True)

    def __enter__(self) -> LinkCutter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            cut = self._cut
        if cut:  # connected after the cancel: do not let it start reading
            _shutdown(sock)

    def _watch(self) -> None:
        # woken at once by the end of the download (`_done`), so `__exit__` does not wait a poll out
        while not self._done.wait(POLL_S):
            if self.cancel.is_set():
                with self._lock:
                    self._cut = True
                    sockets = list(self._sockets)
                for sock in sockets:
                    _shutdown(sock)
                return


def _shutdown(sock: socket.socket) -> None:
    # the plain socket's shutdown, also for a TLS socket: SSLSocket.shutdown would drop the SSL
    # object under the reading thread; on the file descriptor, the blocked read just sees EOF
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, cutter: LinkCutter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cutter = cutter

    def connect(self) -> None:
        super().connect()
        self._cutter.add(self.sock)


class _HTTPSConnection(_HTTPConnection, http.client.HTTPSConnection):
    # MRO: _HTTPConnection.connect -> HTTPSConnection.connect (TLS wrap), so the TLS socket is handed over
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, cutter: LinkCutter) -> None:
        super().__init__()
        self._cutter = cutter

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPConnection, req, cutter=self._cutter)  # type: ignore[arg-type]


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, cutter: LinkCutter) -> None:
        super().__init__()
        self._cutter = cutter

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPSConnection, req, cutter=self._cutter)  # type: ignore[arg-type]


def open_url(request: urllib.request.Request, timeout: float, cutter: LinkCutter | None) -> Any:
    """`urllib.request.urlopen`, with every connection it makes handed to `cutter`."""
    if cutter is None:
        return urllib.request.urlopen(request, timeout=timeout)
    opener = urllib.request.build_opener(_HTTPHandler(cutter), _HTTPSHandler(cutter))
    return opener.open(request, timeout=timeout)
