"""`modelfleet quickstart`: sample model -> register -> deploy -> call -> update -> call."""

from __future__ import annotations

import typer

from modelfleet.deployer.cli._common import (
    OutputFormat,
    OutputOption,
    emit_json,
    progress_for,
    registry,
)
from modelfleet.deployer.quickstart import run_quickstart


def quickstart(
    keep: bool = typer.Option(False, "--keep", help="leave the service running afterwards"),
    output: OutputFormat = OutputOption,
) -> None:
    """From nothing to a called, updated endpoint on this machine (no Docker needed)."""
    summary = run_quickstart(registry(), keep=keep, progress=progress_for(output))
    if output is OutputFormat.json:
        emit_json(summary.to_dict())
        return
    typer.echo("")
    typer.echo(f"quickstart done in {summary.seconds:.1f}s (registry: {summary.home})")
    typer.echo(f"  model versions : {' -> '.join(summary.versions)}")
    for i, call in enumerate(summary.calls, 1):
        typer.echo(
            f"  call {i}         : version {call['model_version']} -> labels {call['labels']}"
            f" ({call['elapsed_ms']} ms)"
        )
    if summary.kept:
        typer.echo(f"  service        : {summary.service} at {summary.scoring_uri} (kept)")
        typer.echo(f"  try            : modelfleet service show {summary.service}")
    else:
        typer.echo(f"  service        : {summary.service} deleted (pass --keep to keep it)")
