"""Fixtures for the deployer's integration tests: temp $MODELFLEET_HOME, CLI runner,
registered digits models, and cleanup of every service a test leaves running."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from modelfleet.deployer.cli import app
from modelfleet.deployer.registry import Registry
from modelfleet.deployer.samples import digits_rows
from modelfleet.deployer.services import ServiceManager


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "home"
    monkeypatch.setenv("MODELFLEET_HOME", str(path))
    yield path
    if (path / "registry.db").exists():
        manager = ServiceManager(Registry(path))
        for record in manager.registry.list_services():
            manager.delete(record.name)


@pytest.fixture
def cli(home: Path) -> Callable[..., Result]:
    runner = CliRunner()

    def run(*args: str) -> Result:
        return runner.invoke(app, list(args), catch_exceptions=False)

    return run


@pytest.fixture
def digits_models(home: Path, digits_onnx: Path, digits_onnx_v2: Path) -> Registry:
    """digits:1 and digits:2 registered in the temporary home."""
    registry = Registry(home)
    registry.register("digits", digits_onnx)
    registry.register("digits", digits_onnx_v2)
    return registry


@pytest.fixture(scope="session")
def request_body() -> str:
    return json.dumps({"data": digits_rows(2)})
