"""Shared fixtures: free ports, real services started per test session, sample models.

A missing service (mosquitto, a Docker engine) skips the tests that need it on a
developer machine, and fails them when CI=true: CI must exercise everything.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from servicekit import IN_CI, free_port, missing_service, wait_for_port

__all__ = ["IN_CI", "free_port", "missing_service", "wait_for_port"]


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits LogisticRegression as ONNX (version 1 of the sample model)."""
    from modelfleet.deployer.samples import make_digits_onnx

    return make_digits_onnx(tmp_path_factory.mktemp("digits-v1") / "model.onnx", variant=1)


@pytest.fixture(scope="session")
def digits_onnx_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different version of the digits model."""
    from modelfleet.deployer.samples import make_digits_onnx

    return make_digits_onnx(tmp_path_factory.mktemp("digits-v2") / "model.onnx", variant=4)


class Mosquitto:
    """A mosquitto broker on a free loopback port, with an optional extra config."""

    def __init__(self, workdir: Path, extra_config: str = "") -> None:
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "persistence false\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            f"log_dest file {self.log}\n"
            + (self.extra_config or "allow_anonymous true\n")
        )
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if not found:
        missing_service("mosquitto is not installed (apt-get install mosquitto)")
    return str(found)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh anonymous broker for one test."""
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def docker_client() -> object:
    """A client for a running Docker engine."""
    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:  # any failure to reach the engine means "no engine"
        missing_service(f"no Docker engine reachable: {exc}")
    return client
