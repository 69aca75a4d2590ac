"""Fixtures for the deployer's unit tests: a temporary $MODELFLEET_HOME and a CLI runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from modelfleet.deployer.cli import app


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("MODELFLEET_HOME", str(path))
    return path


@pytest.fixture
def cli(home: Path) -> Callable[..., Result]:
    """Run `modelfleet ARGS...` in-process against the temporary home."""
    runner = CliRunner()

    def run(*args: str) -> Result:
        return runner.invoke(app, list(args), catch_exceptions=False)

    return run
