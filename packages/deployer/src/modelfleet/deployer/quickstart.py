"""The quickstart: from nothing to a called endpoint, as a library of small steps.

sample ONNX model (scikit-learn digits) -> register v1 -> deploy locally with
keys -> call -> register v2 -> update with no downtime -> call -> summary.
Each step is its own function so the device side (broker, agents) can be
added as further steps. The service is deleted at the end, on error and on
Ctrl-C, unless the caller asks to keep it.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet.deployer.config import load_deployment_config, load_inference_config
from modelfleet.deployer.errors import ServiceNotFoundError
from modelfleet.deployer.registry import ModelVersion, Registry
from modelfleet.deployer.samples import digits_rows, make_digits_onnx
from modelfleet.deployer.services import ServiceManager
from modelfleet.deployer.targets.base import Progress

MODEL_NAME = "quickstart-digits"
SERVICE_NAME = "quickstart-digits"


@dataclass
class QuickstartSummary:
    """What the quickstart did, for the final printout and `--output json`."""

    home: str
    model: str = MODEL_NAME
    service: str = SERVICE_NAME
    scoring_uri: str | None = None
    versions: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    kept: bool = False
    seconds: float = 0.0
    devices: dict[str, Any] | None = None  # the device side (fleet.local), when run

    def to_dict(self) -> dict[str, Any]:
        return {
            "home": self.home,
            "model": self.model,
            "service": self.service,
            "scoring_uri": self.scoring_uri,
            "versions": self.versions,
            "calls": self.calls,
            "service_kept": self.kept,
            "seconds": round(self.seconds, 2),
            "devices": self.devices,
        }


def make_samples(folder: Path, progress: Progress) -> tuple[Path, Path]:
    progress("building two versions of the sample digits model (scikit-learn -> ONNX)")
    v1 = make_digits_onnx(folder / "v1" / "model.onnx", variant=1)
    v2 = make_digits_onnx(folder / "v2" / "model.onnx", variant=4)
    return v1, v2


def register(registry: Registry, path: Path, note: str, progress: Progress) -> ModelVersion:
    result = registry.register(
        MODEL_NAME, path, tags={"source": "quickstart"}, description=note
    )
    verb = "registered" if result.created else "already registered (same bytes) as"
    progress(f"{verb} {result.model.key} sha256={result.model.sha256[:12]}")
    return result.model


def deploy(manager: ServiceManager, model: ModelVersion, progress: Progress) -> str:
    with contextlib.suppress(ServiceNotFoundError):
        manager.delete(SERVICE_NAME, progress)  # a service kept by an earlier run
    deployment, _ = load_deployment_config(None, overrides={"authEnabled": True})
    record = manager.deploy(
        SERVICE_NAME, [model.key], load_inference_config(), deployment, "local", progress
    )
    assert record.scoring_uri is not None
    return record.scoring_uri


def call(manager: ServiceManager, rows: int, progress: Progress) -> dict[str, Any]:
    body = json.dumps({"data": digits_rows(rows)}).encode()
    result = manager.call(SERVICE_NAME, body)
    labels = result.body.get("label") if isinstance(result.body, dict) else result.body
    progress(
        f"called {SERVICE_NAME} with its primary key: model version {result.model_version}, "
        f"labels {labels}, {result.elapsed_ms:.1f} ms"
    )
    return {"model_version": result.model_version, "labels": labels,
            "elapsed_ms": round(result.elapsed_ms, 2)}  # fmt: skip


def update(manager: ServiceManager, model: ModelVersion, progress: Progress) -> None:
    manager.update(SERVICE_NAME, [model.key], progress=progress)


def run_quickstart(
    registry: Registry | None = None,
    *,
    keep: bool = False,
    progress: Progress = print,
    devices: int = 3,
) -> QuickstartSummary:
    """Run every step; cleans up the service unless `keep` (also on Ctrl-C)."""
    started = time.monotonic()
    registry = registry if registry is not None else Registry()
    manager = ServiceManager(registry)
    summary = QuickstartSummary(home=str(registry.home))
    deployed = False
    try:
        with tempfile.TemporaryDirectory(prefix="modelfleet-quickstart-") as tmp:
            v1_path, v2_path = make_samples(Path(tmp), progress)
            v1 = register(registry, v1_path, "digits, C=1", progress)
            summary.scoring_uri = deploy(manager, v1, progress)
            deployed = True
            summary.versions.append(v1.key)
            summary.calls.append(call(manager, 3, progress))
            v2 = register(registry, v2_path, "digits, C=0.25", progress)
            update(manager, v2, progress)
            summary.versions.append(v2.key)
            summary.calls.append(call(manager, 3, progress))
            if devices:
                # the device side: broker, artifact server, agents, v1 then v2 in two stages
                from modelfleet.deployer.fleet.local import run_device_quickstart

                fleet = run_device_quickstart(registry, v1, v2, Path(tmp) / "fleet", progress, devices)
                summary.devices = fleet.to_dict()
    finally:
        if deployed and not keep:
            with contextlib.suppress(ServiceNotFoundError):
                manager.delete(SERVICE_NAME, progress)
    summary.kept = keep
    summary.seconds = time.monotonic() - started
    return summary
