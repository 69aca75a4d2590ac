"""Fixtures for the Docker target tests: one real engine, cached images, small services.

The base and runtime images are built once per machine (content-tagged and
cached by the library itself); each test then builds only a thin service image.
Helpers live in `docker_helpers.py`: test modules cannot import from a conftest.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker_helpers import Deployed, SpecFactory, binding

from modelfleet.deployer.targets.base import (
    DeploymentConfig,
    InferenceConfig,
    ModelBinding,
    ServiceSpec,
)
from modelfleet.deployer.targets.docker import DockerTarget


@pytest.fixture(scope="session")
def docker_target(docker_client: Any) -> DockerTarget:
    return DockerTarget(docker_client)


@pytest.fixture
def make_spec(tmp_path: Path, digits_onnx: Path) -> SpecFactory:
    """ServiceSpec for a unique service name, the digits model by default."""

    def make(
        *,
        models: tuple[ModelBinding, ...] | None = None,
        inference: InferenceConfig | None = None,
        deployment: DeploymentConfig | None = None,
        name: str | None = None,
        workdir: Path | None = None,
    ) -> ServiceSpec:
        name = name or f"t-{uuid.uuid4().hex[:8]}"
        return ServiceSpec(
            name=name,
            models=models or (binding(digits_onnx),),
            inference=inference or InferenceConfig(),
            deployment=deployment or DeploymentConfig(cpu_cores=0.5, memory_gb=0.5),
            workdir=workdir or (tmp_path / name),
        )

    return make


@pytest.fixture
def deployed(docker_target: DockerTarget) -> Iterator[Deployed]:
    d = Deployed(docker_target)
    yield d
    d.cleanup()
