"""`modelfleet service ...`: list, show, logs, keys, regen-key, call, update, delete."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import typer

from modelfleet.deployer.cli._common import (
    OutputFormat,
    OutputOption,
    emit_fields,
    emit_json,
    emit_table,
    progress_for,
    registry,
)
from modelfleet.deployer.config import load_inference_config
from modelfleet.deployer.errors import DeployerError
from modelfleet.deployer.services import KeyName, ServiceManager
from modelfleet.deployer.targets.base import ServiceRecord, ServiceStatus

app = typer.Typer(help="Inspect, call, update and delete deployed services.", no_args_is_help=True)


def record_view(record: ServiceRecord, status: ServiceStatus | None = None) -> dict[str, Any]:
    data = record.target_data
    view: dict[str, Any] = {
        "name": record.name,
        "target": record.target,
        "state": record.state,
        "scoring_uri": record.scoring_uri,
        "swagger_uri": record.swagger_uri,
        "models": record.models,
        "auth_enabled": bool(data.get("keys_file")),
    }
    for key in ("pid", "port", "workers", "container_name", "image", "log_file", "note"):
        if data.get(key) is not None:
            view[key] = data[key]
    if status is not None:
        if status.detail:
            view["detail"] = status.detail
        if status.last_log_lines:
            view["last_log_lines"] = list(status.last_log_lines)
    return view


def _manager() -> ServiceManager:
    return ServiceManager(registry())


@app.command("list")
def list_(output: OutputFormat = OutputOption) -> None:
    """List services with their live state."""
    rows = [record_view(r, s) for r, s in _manager().list()]
    if output is OutputFormat.json:
        emit_json(rows)
    else:
        emit_table(rows, ["name", "target", "state", "models", "scoring_uri"])


@app.command()
def show(service: str = typer.Argument(...), output: OutputFormat = OutputOption) -> None:
    """State, scoring URI, swagger URI, model versions (and last log lines when failed)."""
    record, status = _manager().status(service)
    view = record_view(record, status)
    if output is OutputFormat.json:
        emit_json(view)
        return
    lines = view.pop("last_log_lines", [])
    emit_fields(view)
    if lines and record.state == "failed":
        typer.echo("last log lines:")
        for line in lines:
            typer.echo(f"  {line}")


@app.command()
def logs(
    service: str = typer.Argument(...),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new lines"),
    tail: int = typer.Option(0, "--tail", min=0, help="only the last N lines (0: all)"),
    output: OutputFormat = typer.Option(
        OutputFormat.table, "--output", "-o", help="table: raw lines; json: one JSON object a line"
    ),
) -> None:
    """Print the service's log."""
    lines: Iterable[str] = _manager().logs(service, follow)
    if tail and not follow:
        lines = list(lines)[-tail:]
    for line in lines:
        typer.echo(json.dumps({"service": service, "line": line}) if output is OutputFormat.json else line)


@app.command()
def keys(service: str = typer.Argument(...), output: OutputFormat = OutputOption) -> None:
    """Print the primary and secondary keys."""
    found = _manager().keys(service)
    if output is OutputFormat.json:
        emit_json(found)
    else:
        emit_fields(found)


@app.command("regen-key")
def regen_key(
    service: str = typer.Argument(...),
    key: str = typer.Option(..., "--key", "-k", help="primary|secondary"),
    value: str = typer.Option(None, "--value", help="the new key (default: random)"),
    output: OutputFormat = OutputOption,
) -> None:
    """Replace one key; the server picks it up without a restart."""
    if key not in ("primary", "secondary"):
        raise DeployerError(f"unknown key {key!r}", hint="use --key primary or --key secondary")
    which: KeyName = "primary" if key == "primary" else "secondary"
    found = _manager().regen_key(service, which, value)
    if output is OutputFormat.json:
        emit_json(found)
    else:
        typer.echo(f"regenerated the {key} key of {service}")
        emit_fields(found)


def _read_data(data: str) -> bytes:
    path = Path(data[1:]) if data.startswith("@") else Path(data)
    looks_like_json = data.lstrip()[:1] in ("{", "[", '"')
    if data.startswith("@") or (not looks_like_json and path.is_file()):
        try:
            return path.read_bytes()
        except OSError as exc:
            raise DeployerError(f"cannot read --data file {path}: {exc.strerror}") from exc
    try:
        json.loads(data)
    except ValueError as exc:
        raise DeployerError(
            f"--data is neither an existing file nor valid JSON ({exc})",
            hint='pass --data request.json or --data \'{"data": [[...]]}\'',
        ) from exc
    return data.encode()


@app.command()
def call(
    service: str = typer.Argument(...),
    data: str = typer.Option(..., "--data", "-d", help="request body: FILE, @FILE or JSON"),
    key: str = typer.Option(None, "--key", help="use this key instead of the primary one"),
    no_auth: bool = typer.Option(False, "--no-auth", help="send no key"),
    content_type: str = typer.Option("application/json", "--content-type"),
    output: OutputFormat = OutputOption,
) -> None:
    """POST a request to the service's scoring URI, with its key."""
    body = _read_data(data)
    result = _manager().call(
        service, body, content_type=content_type, key=key, use_auth=not no_auth
    )
    if output is OutputFormat.json:
        emit_json(
            {
                "status_code": result.status_code,
                "model_version": result.model_version,
                "elapsed_ms": round(result.elapsed_ms, 2),
                "body": result.body,
            }
        )
    elif isinstance(result.body, str):
        typer.echo(result.body)
    else:
        typer.echo(json.dumps(result.body))


@app.command()
def update(
    service: str = typer.Argument(...),
    model: list[str] = typer.Option(..., "--model", "-m", help="NAME:VERSION, repeatable"),
    inference_config: Path = typer.Option(
        None, "-ic", "--inference-config", "--ic", help="a new inferenceconfig.json"
    ),
    output: OutputFormat = OutputOption,
) -> None:
    """Move the service to other model versions with no downtime."""
    inference = load_inference_config(inference_config) if inference_config else None
    record = _manager().update(service, model, inference, progress_for(output))
    view = record_view(record)
    if output is OutputFormat.json:
        emit_json(view)
    else:
        emit_fields(view)


@app.command()
def delete(
    service: str = typer.Argument(...),
    force: bool = typer.Option(False, "--force", help="forget it even if it cannot be stopped"),
    output: OutputFormat = OutputOption,
) -> None:
    """Stop the service and forget it."""
    record = _manager().delete(service, progress_for(output), force=force)
    if output is OutputFormat.json:
        emit_json({"deleted": record.name})
    else:
        typer.echo(f"deleted {record.name}")
