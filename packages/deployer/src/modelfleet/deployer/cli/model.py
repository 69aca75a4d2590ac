"""`modelfleet model ...`: register, list, show, download, delete model versions."""

from __future__ import annotations

from pathlib import Path

import typer

from modelfleet.deployer.cli._common import (
    OutputFormat,
    OutputOption,
    emit_fields,
    emit_json,
    emit_table,
    parse_pairs,
    registry,
)
from modelfleet.deployer.registry import parse_model_id

app = typer.Typer(help="Register and manage model versions.", no_args_is_help=True)

_LIST_COLUMNS = ["name", "version", "framework", "format", "size", "sha256", "tags", "created_at"]


@app.command()
def register(
    name: str = typer.Option(..., "--name", "-n", help="model name; versions count up per name"),
    path: Path = typer.Option(..., "--path", "-p", "--asset-path", help="model file or folder"),
    tag: list[str] = typer.Option(None, "--tag", "-t", help="k=v, repeatable"),
    prop: list[str] = typer.Option(None, "--property", help="k=v, repeatable"),
    description: str = typer.Option("", "--description", "-d"),
    framework: str = typer.Option(
        None, "--framework", "-f", help="onnx|tflite|sklearn|custom (default: from the file)"
    ),
    sign_key: Path = typer.Option(None, "--sign-key", help="Ed25519 private key PEM"),
    output: OutputFormat = OutputOption,
) -> None:
    """Register a model file or folder as the next version of NAME."""
    result = registry().register(
        name,
        path,
        tags=parse_pairs(tag, "--tag"),
        properties=parse_pairs(prop, "--property"),
        description=description,
        framework=framework,
        sign_key=sign_key,
    )
    model = result.model
    if output is OutputFormat.json:
        emit_json(
            {
                **model.to_dict(),
                "created": result.created,
                "signature_added": result.signature_added,
            }
        )
        return
    if result.created:
        signed = f", signed by key {model.key_id}" if model.key_id else ""
        typer.echo(f"registered {model.key} ({model.framework}, {model.size} bytes{signed})")
    elif result.signature_added:
        typer.echo(
            f"identical bytes already registered as {model.key}; signature added "
            f"(key {model.key_id})"
        )
    else:
        signed = f" (signed by key {model.key_id})" if sign_key and model.key_id else ""
        typer.echo(f"identical bytes are already registered as {model.key}{signed}; nothing added")


@app.command("list")
def list_(
    name: str = typer.Option(None, "--name", "-n", help="only this model"),
    tag: list[str] = typer.Option(None, "--tag", "-t", help="k=v, repeatable (all must match)"),
    output: OutputFormat = OutputOption,
) -> None:
    """List registered model versions."""
    models = registry().list_models(name=name, tags=parse_pairs(tag, "--tag"))
    rows = [m.to_dict() for m in models]
    if output is OutputFormat.json:
        emit_json(rows)
        return
    for row in rows:
        row["sha256"] = row["sha256"][:12]
    emit_table(rows, _LIST_COLUMNS)


@app.command()
def show(
    model: str = typer.Argument(..., help="NAME[:VERSION] (default: the latest version)"),
    output: OutputFormat = OutputOption,
) -> None:
    """Show one model version."""
    reg = registry()
    found = reg.resolve(model)
    data = {**found.to_dict(), "services": reg.services_using(found)}
    if output is OutputFormat.json:
        emit_json(data)
    else:
        emit_fields(data)


@app.command()
def download(
    model: str = typer.Argument(..., help="NAME:VERSION"),
    to: Path = typer.Option(..., "--to", help="folder to write the model into"),
    output: OutputFormat = OutputOption,
) -> None:
    """Copy a model version's file (or folder) out of the registry."""
    reg = registry()
    name, version = parse_model_id(model, require_version=True)
    found = reg.get_model(name, version)
    reg.blobs.verify(found.sha256)
    target = reg.blobs.export(found.sha256, found.format, found.filename, to)
    if output is OutputFormat.json:
        emit_json({"model": found.key, "path": str(target), "sha256": found.sha256})
    else:
        typer.echo(f"{found.key} -> {target}")


@app.command()
def delete(
    model: str = typer.Argument(..., help="NAME:VERSION"),
    force: bool = typer.Option(False, "--force", help="delete even while a service uses it"),
    output: OutputFormat = OutputOption,
) -> None:
    """Delete a model version (refused while a service uses it, unless --force)."""
    name, version = parse_model_id(model, require_version=True)
    assert version is not None
    deleted = registry().delete_model(name, version, force=force)
    if output is OutputFormat.json:
        emit_json({"deleted": deleted.key})
    else:
        typer.echo(f"deleted {deleted.key}")
