"""`modelfleet deploy --target docker` dispatches through the target map to the Docker target."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import Result

from modelfleet.deployer.registry import Registry

pytestmark = pytest.mark.docker


def test_cli_deploys_calls_and_deletes_a_docker_service(
    cli: Callable[..., Result], digits_models: Registry, request_body: str, docker_client: Any
) -> None:
    out = cli("deploy", "digits-box", "-m", "digits:1", "--target", "docker",
              "--cpu-cores", "0.5", "--memory-gb", "0.5", "-o", "json")  # fmt: skip
    assert out.exit_code == 0, out.output
    view = json.loads(out.stdout)
    try:
        assert view["target"] == "docker" and view["state"] == "healthy"
        container = docker_client.containers.get(view["container_name"])
        assert container.attrs["HostConfig"]["NanoCpus"] == 500_000_000
        called = json.loads(cli("service", "call", "digits-box", "-d", request_body, "-o", "json").stdout)
        assert called["model_version"] == "1" and called["body"]["label"] == [0, 1]
        listed = json.loads(cli("service", "list", "-o", "json").stdout)
        assert [(s["name"], s["target"], s["state"]) for s in listed] == [
            ("digits-box", "docker", "healthy")
        ]
    finally:
        deleted = cli("service", "delete", "digits-box")
    assert deleted.exit_code == 0, deleted.output
    assert docker_client.containers.list(all=True, filters={"name": view["container_name"]}) == []
