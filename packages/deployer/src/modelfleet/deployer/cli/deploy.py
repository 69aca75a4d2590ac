"""`modelfleet deploy`: deploy registered model versions as a scoring service."""

from __future__ import annotations

from pathlib import Path

import typer

from modelfleet.deployer.cli._common import (
    OutputFormat,
    OutputOption,
    emit_fields,
    emit_json,
    progress_for,
    registry,
)
from modelfleet.deployer.cli.service import record_view
from modelfleet.deployer.config import load_deployment_config, load_inference_config
from modelfleet.deployer.errors import DeployerError
from modelfleet.deployer.services import ServiceManager


def deploy(
    service: str = typer.Argument(None, help="service name (or -n)"),
    name: str = typer.Option(None, "--name", "-n", help="service name, as az ml model deploy -n"),
    model: list[str] = typer.Option(..., "--model", "-m", help="NAME:VERSION, repeatable"),
    inference_config: Path = typer.Option(
        None, "-ic", "--inference-config", "--ic", help="inferenceconfig.json"
    ),
    deployment_config: Path = typer.Option(
        None, "-dc", "--deployment-config", "--dc", help="deploymentconfig.json"
    ),
    target: str = typer.Option(
        None, "--target", "-t", help="local|docker (default: computeType, else local)"
    ),
    entry_script: str = typer.Option(None, "--entry-script", help="score.py with init()/run()"),
    source_directory: Path = typer.Option(None, "--source-directory", help="folder of the script"),
    requirements: Path = typer.Option(None, "--requirements", help="pip requirements file"),
    conda_file: Path = typer.Option(None, "--conda-file", help="conda env file (pip section)"),
    base_image: str = typer.Option(None, "--base-image", help="docker: custom base image"),
    port: int = typer.Option(None, "--port", help="port on 127.0.0.1 (default: a free one)"),
    cpu_cores: float = typer.Option(None, "--cpu-cores", help="cpu limit"),
    memory_gb: float = typer.Option(None, "--memory-gb", help="memory limit in GB"),
    auth: bool = typer.Option(None, "--auth/--no-auth", help="require keys (default: on)"),
    scoring_timeout_ms: int = typer.Option(None, "--scoring-timeout-ms"),
    max_concurrent_requests: int = typer.Option(None, "--max-concurrent-requests"),
    replicas: int = typer.Option(None, "--replicas"),
    wait: bool = typer.Option(
        True, "--wait", help="accepted for az ml parity: deploy always waits for readiness"
    ),
    output: OutputFormat = OutputOption,
) -> None:
    """Deploy model versions as a service: -m NAME:VERSION -ic ... -dc ... --target local."""
    service_name = service or name
    if not service_name:
        raise DeployerError("no service name given", hint="modelfleet deploy SERVICE -m NAME:VER")
    if service and name and service != name:
        raise DeployerError(f"two service names given ({service!r} and -n {name!r})")
    inference = load_inference_config(
        inference_config,
        overrides={
            "entryScript": entry_script,
            "sourceDirectory": str(source_directory) if source_directory else None,
            "requirementsFile": str(requirements) if requirements else None,
            "condaFile": str(conda_file) if conda_file else None,
            "baseImage": base_image,
        },
    )
    deployment, compute_type = load_deployment_config(
        deployment_config,
        overrides={
            "port": port,
            "cpu": cpu_cores,
            "memoryInGB": memory_gb,
            "authEnabled": auth,
            "scoringTimeoutMs": scoring_timeout_ms,
            "maxConcurrentRequestsPerContainer": max_concurrent_requests,
            "numReplicas": replicas,
        },
    )
    manager = ServiceManager(registry())
    record = manager.deploy(
        service_name,
        model,
        inference,
        deployment,
        target or compute_type or "local",
        progress_for(output),
    )
    view = record_view(record)
    if output is OutputFormat.json:
        emit_json(view)
    else:
        emit_fields(view)
        if record.target_data.get("keys_file"):
            typer.echo(f"keys: modelfleet service keys {record.name}")
