"""The deployment-target plug-in interface: one implementation per module.

The rest of the deployer imports only this module; `targets/__init__.py`
maps a target name ("local", "docker", ...) to its implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

ServiceState = Literal["creating", "healthy", "updating", "failed", "deleting", "stopped"]

Progress = Callable[[str], None]
"""Receives one human-readable line per step of a long operation."""


def no_progress(_line: str) -> None:
    """A `Progress` that shows nothing (scripts, `--output json`, cleanup paths)."""


@dataclass(frozen=True)
class ModelBinding:
    """One registered model version a service serves, as stored in the registry."""

    name: str
    version: int
    path: Path  # the artifact's local file or folder (read-only; copy before changing)
    sha256: str
    framework: str = "onnx"


@dataclass(frozen=True)
class InferenceConfig:
    """How to score (Azure ML's inferenceconfig.json)."""

    source_directory: Path | None = None
    entry_script: str | None = None  # relative to source_directory; None = no-code mode
    runtime: str = "python"
    requirements_file: Path | None = None  # pip requirements
    conda_file: Path | None = None  # its pip section is honoured
    base_image: str | None = None
    extra_dockerfile_steps: Path | None = None  # Dockerfile steps for container targets


@dataclass(frozen=True)
class DeploymentConfig:
    """Where and how to run (Azure ML's deploymentconfig.json), for every target."""

    port: int | None = None  # None: pick a free port
    cpu_cores: float = 1.0
    memory_gb: float = 1.0
    replicas: int = 1
    auth_enabled: bool = True
    primary_key: str | None = None  # None: generated
    secondary_key: str | None = None
    scoring_timeout_ms: int = 60_000
    max_concurrent_requests: int = 64
    autoscale_enabled: bool = False
    autoscale_min_replicas: int = 1
    autoscale_max_replicas: int = 10
    autoscale_target_utilization: int = 70


@dataclass(frozen=True)
class ServiceSpec:
    """Everything a target needs to deploy or update one service."""

    name: str
    models: tuple[ModelBinding, ...]
    inference: InferenceConfig
    deployment: DeploymentConfig
    workdir: Path  # a folder the deployer owns for this service (keys, logs, build context)


@dataclass
class ServiceRecord:
    """A deployed service as the registry database stores it."""

    name: str
    target: str
    state: ServiceState
    scoring_uri: str | None = None
    swagger_uri: str | None = None
    models: list[str] = field(default_factory=list)  # "name:version"
    target_data: dict[str, Any] = field(default_factory=dict)  # pid, container id, image tag, ...


def updated_record(record: ServiceRecord, spec: ServiceSpec, target_data: dict[str, Any]) -> ServiceRecord:
    """The record of a service that now serves `spec`'s models, healthy, at the same URIs."""
    return replace(
        record,
        state="healthy",
        models=[f"{m.name}:{m.version}" for m in spec.models],
        target_data=target_data,
    )


@dataclass(frozen=True)
class ServiceStatus:
    state: ServiceState
    detail: str = ""
    last_log_lines: tuple[str, ...] = ()


class DeploymentTarget(Protocol):
    """A place that runs scoring servers."""

    name: str

    def deploy(self, spec: ServiceSpec, progress: Progress) -> ServiceRecord:
        """Create the service and return once it answers `GET /v2/health/ready`.

        On failure, leaves nothing half-created and raises a DeployerError.
        """
        ...

    def update(self, record: ServiceRecord, spec: ServiceSpec, progress: Progress) -> ServiceRecord:
        """Move the service to `spec` with no failed request: the new version is
        warm before traffic moves to it."""
        ...

    def status(self, record: ServiceRecord) -> ServiceStatus: ...

    def logs(self, record: ServiceRecord, follow: bool) -> Iterator[str]: ...

    def delete(self, record: ServiceRecord, progress: Progress) -> None: ...
