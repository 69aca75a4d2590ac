"""MODELFLEET_DOCKER_READY_TIMEOUT is read when a deploy or update starts, and checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfleet.deployer.errors import DeploymentError
from modelfleet.deployer.targets.base import (
    DeploymentConfig,
    InferenceConfig,
    ServiceRecord,
    ServiceSpec,
)
from modelfleet.deployer.targets.docker import DockerTarget, ready_timeout


def test_default_and_a_value_set_after_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELFLEET_DOCKER_READY_TIMEOUT", raising=False)
    assert ready_timeout() == 120.0
    monkeypatch.setenv("MODELFLEET_DOCKER_READY_TIMEOUT", "2.5")
    assert ready_timeout() == 2.5
    monkeypatch.setenv("MODELFLEET_DOCKER_READY_TIMEOUT", " ")
    assert ready_timeout() == 120.0


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf", "1e999"])
def test_bad_value_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MODELFLEET_DOCKER_READY_TIMEOUT", value)
    with pytest.raises(DeploymentError) as err:
        ready_timeout()
    assert str(err.value) == (
        f"MODELFLEET_DOCKER_READY_TIMEOUT={value!r} is not a number of seconds above 0"
    )
    assert "unset it for the default (120)" in err.value.hint


def test_deploy_and_update_refuse_a_bad_value_before_touching_the_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MODELFLEET_DOCKER_READY_TIMEOUT", "two minutes")
    target = DockerTarget(client=object())  # any use of the engine would fail differently
    spec = ServiceSpec("s", (), InferenceConfig(), DeploymentConfig(), tmp_path)
    with pytest.raises(DeploymentError, match="READY_TIMEOUT='two minutes' is not a number"):
        target.deploy(spec, lambda _line: None)
    record = ServiceRecord(name="s", target="docker", state="healthy")
    with pytest.raises(DeploymentError, match="READY_TIMEOUT='two minutes' is not a number"):
        target.update(record, spec, lambda _line: None)
