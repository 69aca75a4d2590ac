"""The service lifecycle library over the Docker target, as the CLI drives it."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from docker_helpers import containers_of

from modelfleet.deployer.errors import ServiceCallError
from modelfleet.deployer.registry import Registry
from modelfleet.deployer.samples import digits_rows
from modelfleet.deployer.services import ServiceManager
from modelfleet.deployer.targets.base import DeploymentConfig, InferenceConfig

pytestmark = pytest.mark.docker


def test_register_deploy_call_regen_update_delete_in_docker(
    tmp_path: Path, digits_onnx: Path, digits_onnx_v2: Path, docker_client: Any
) -> None:
    svc = f"digits-docker-{uuid.uuid4().hex[:6]}"  # concurrent test runs share one engine
    registry = Registry(tmp_path / "home")
    registry.register("digits", digits_onnx)
    registry.register("digits", digits_onnx_v2)
    services = ServiceManager(registry)
    body = json.dumps({"data": digits_rows(1)}).encode()
    record = services.deploy(
        svc,
        ["digits:1"],
        InferenceConfig(),
        DeploymentConfig(cpu_cores=0.5, memory_gb=0.5),
        target="docker",
    )
    try:
        assert record.target == "docker" and record.state == "healthy"
        first = services.call(svc, body)
        assert first.status_code == 200 and first.model_version == "1"
        with pytest.raises(ServiceCallError, match=r"refused the call \(401\)"):
            services.call(svc, body, use_auth=False)

        old = services.keys(svc)["primary"]
        new = services.regen_key(svc, "primary")["primary"]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                services.call(svc, body, key=new)
                break
            except ServiceCallError:
                time.sleep(0.2)
        assert services.call(svc, body, key=new).status_code == 200
        with pytest.raises(ServiceCallError, match="401"):
            services.call(svc, body, key=old)

        updated = services.update(svc, ["digits:2"])
        assert updated.models == ["digits:2"]
        assert services.call(svc, body).model_version == "2"
        listed = {r.name: (r, s) for r, s in services.list()}
        assert listed[svc][1].state == "healthy"
        assert listed[svc][0].models == ["digits:2"]
    finally:
        services.delete(svc)
    assert containers_of(docker_client, svc) == []
    assert services.list() == []
