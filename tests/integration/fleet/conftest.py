"""Fixtures for the fleet integration tests: a broker, the registry's artifact server, agents."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_harness import TOKEN, Fleet  # type: ignore[import-not-found]


@pytest.fixture
def fleet(tmp_path: Path, mosquitto: Any) -> Iterator[Fleet]:
    from modelfleet.deployer.registry.server import ArtifactServer
    from modelfleet.deployer.registry.store import Registry

    registry = Registry(tmp_path / "home")
    server = ArtifactServer(registry, token=TOKEN).start()
    f = Fleet(tmp_path, mosquitto.port, registry, server)
    yield f
    f.stop()
