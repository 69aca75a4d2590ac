"""Fixtures for the Docker target tests: one real engine, cached images, small services.

The base and runtime images are built once per machine (content-tagged and
cached by the library itself); each test then builds only a thin service image.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelfleet.deployer.targets.base import (
    DeploymentConfig,
    InferenceConfig,
    ModelBinding,
    ServiceRecord,
    ServiceSpec,
)
from modelfleet.deployer.targets.docker import DockerTarget

SpecFactory = Callable[..., ServiceSpec]


def binding(path: Path, version: int = 1, name: str = "digits") -> ModelBinding:
    import hashlib

    return ModelBinding(
        name=name,
        version=version,
        path=path,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        framework="onnx",
    )


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


class Deployed:
    """Records deployed during a test, deleted at its end whatever happened."""

    def __init__(self, target: DockerTarget) -> None:
        self.target = target
        self.records: list[ServiceRecord] = []
        self.progress: list[str] = []

    def deploy(self, spec: ServiceSpec) -> ServiceRecord:
        record = self.target.deploy(spec, self.progress.append)
        self.records.append(record)
        return record

    def cleanup(self) -> None:
        for record in self.records:
            self.target.delete(record, lambda _line: None)


@pytest.fixture
def deployed(docker_target: DockerTarget) -> Iterator[Deployed]:
    d = Deployed(docker_target)
    yield d
    d.cleanup()


def containers_of(client: Any, service: str) -> list[Any]:
    return list(
        client.containers.list(all=True, filters={"label": f"modelfleet.service={service}"})
    )
