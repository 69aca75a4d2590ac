"""Deployment targets: local process, docker, aci, kubernetes.

Targets are found by name through `TARGETS` (name -> "module:Class") and
imported only when used, so the CLI starts fast and a target whose
dependencies are missing only fails when someone picks it.
"""

from __future__ import annotations

import importlib
from typing import cast

from modelfleet.deployer.errors import UnknownTargetError
from modelfleet.deployer.targets.base import DeploymentTarget

TARGETS: dict[str, str] = {
    "local": "modelfleet.deployer.targets.local:LocalTarget",
    "docker": "modelfleet.deployer.targets.docker:DockerTarget",
}


def target_names() -> list[str]:
    return sorted(TARGETS)


def get_target(name: str) -> DeploymentTarget:
    """A fresh instance of the target called `name`."""
    where = TARGETS.get(name)
    if where is None:
        raise UnknownTargetError(
            f"unknown deployment target {name!r}",
            hint=f"available targets: {', '.join(target_names())}",
        )
    module_name, _, class_name = where.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownTargetError(
            f"deployment target {name!r} is not available: {exc}",
            hint="install the deployer with all its dependencies (uv sync)",
        ) from exc
    return cast(DeploymentTarget, getattr(module, class_name)())
