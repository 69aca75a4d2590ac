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
    devices: int = typer.Option(3, "--devices", min=0, help="device agents for the fleet part (0 skips it)"),
    output: OutputFormat = OutputOption,
) -> None:
    """From nothing to a called, updated endpoint on this machine (no Docker needed)."""
    summary = run_quickstart(registry(), keep=keep, progress=progress_for(output), devices=devices)
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
    if summary.devices:
        fleet = summary.devices
        for rollout in fleet["rollouts"]:
            stages = ", ".join(f"stage {s['stage']} {s['devices']} dev {s['seconds']:.2f}s" for s in rollout["stages"])
            typer.echo(f"  fleet rollout  : {rollout['model']} {rollout['state']} ({stages})")
        for call in fleet["calls"]:
            typer.echo(f"  device call    : {call['device']} version {call['model_version']} -> labels {call['labels']}")
        states = ", ".join(f"{d['device']}={d['model']} {d['status']}" for d in fleet["states"])
        typer.echo(f"  devices        : {states} (agents and broker stopped)")
