"""Fixtures for the scoring server tests: an in-process server on a free port, a served process."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelfleet.scoring import ModelHost, ModelSpec, ScoringServer, ServerSettings

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "scoring"


class RunningServer:
    """A ScoringServer on its own event loop thread, on a free loopback port."""

    def __init__(self, host: ModelHost, settings: ServerSettings) -> None:
        self.host = host
        self.settings = settings
        import uvloop

        # the event loop production runs on
        self.loop = uvloop.new_event_loop()
        self.server = ScoringServer(host, settings)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> RunningServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's loop thread (e.g. set_keys) and wait."""
        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        self.host.unload()


@pytest.fixture(autouse=True)
def _restore_model_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entry scripts set the model folder env vars in-process; undo that after each test."""
    for var in ("MODELFLEET_MODEL_DIR", "AZUREML_MODEL_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def start_server() -> Iterator[Callable[..., RunningServer]]:
    """Start a server for a ModelSpec (or none) with the given settings; stopped after the test."""
    started: list[RunningServer] = []

    def start(spec: ModelSpec | None = None, **settings: Any) -> RunningServer:
        threshold = settings.get("inline_threshold_ms", 1.0)
        host = ModelHost(inline_threshold_ms=threshold)
        if spec is not None:
            host.load(spec)
        running = RunningServer(host, ServerSettings(host="127.0.0.1", port=0, **settings)).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "modelfleet.scoring", "serve", *args]


def wait_ready(url: str, proc: subprocess.Popen[str] | None = None, timeout: float = 20.0) -> None:
    """Poll /v2/health/ready until 200 (fail early if the process exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"server exited with {proc.returncode}: {out}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@pytest.fixture
def serve_process() -> Iterator[Callable[..., tuple[subprocess.Popen[str], str]]]:
    """Start the real CLI on a free port; returns (process, base url). Stopped after the test."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> tuple[subprocess.Popen[str], str]:
        port = free_port()
        # in-process entry-script loads (any test's) leave their model folder in the env
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("MODELFLEET_", "AZUREML_"))}
        full_env = {**inherited, **(env or {})}
        proc = subprocess.Popen(
            serve_command(*args, "--port", str(port), "--host", "127.0.0.1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        if wait:
            wait_ready(url, proc)
        return proc, url

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture(scope="session")
def digits_rows() -> list[list[float]]:
    from modelfleet.deployer.samples import digits_rows as rows

    return rows(8)
