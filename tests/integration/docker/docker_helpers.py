"""Helpers shared by the Docker target tests (imported by name: conftest modules collide)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelfleet.deployer.targets.base import ModelBinding, ServiceRecord, ServiceSpec
from modelfleet.deployer.targets.docker import DockerTarget

SpecFactory = Callable[..., ServiceSpec]


def binding(path: Path, version: int = 1, name: str = "digits") -> ModelBinding:
    return ModelBinding(
        name=name,
        version=version,
        path=path,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        framework="onnx",
    )


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


def containers_of(client: Any, service: str) -> list[Any]:
    return list(
        client.containers.list(all=True, filters={"label": f"modelfleet.service={service}"})
    )


def primary_key(record: ServiceRecord) -> str:
    """The service's primary key, as `modelfleet service keys` would show it."""
    path = Path(record.target_data["workdir"]) / "secrets" / "keys.json"
    return str(json.loads(path.read_text())["primary"])
