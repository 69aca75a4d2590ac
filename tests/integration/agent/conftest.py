"""Fixtures for the device agent's integration tests: the real registry artifact server,
a controller on a real mosquitto, and agents as subprocesses (see agent_harness.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_harness import AgentProcess, Controller, RegistryHandle  # type: ignore[import-not-found]


@pytest.fixture
def artifact_registry(tmp_path: Path) -> Iterator[RegistryHandle]:
    """The real registry and its artifact server on a free port."""
    from modelfleet.deployer.registry.server import ArtifactServer
    from modelfleet.deployer.registry.store import Registry

    registry = Registry(tmp_path / "registry-home")
    server = ArtifactServer(registry, token="artifact-token").start()
    yield RegistryHandle(registry, server, "artifact-token")
    server.stop()


@pytest.fixture
def controller(mosquitto: Any) -> Iterator[Controller]:
    ctl = Controller(mosquitto.port).start()
    yield ctl
    ctl.stop()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start agents; every one still running is killed at the end."""
    started: list[AgentProcess] = []

    def start(device_id: str, broker_port: int, **settings: Any) -> AgentProcess:
        agent = AgentProcess(tmp_path, device_id, broker_port, **settings).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.kill()
