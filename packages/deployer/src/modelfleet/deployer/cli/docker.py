"""`modelfleet docker ...`: prepare the Docker target's offline images ahead of a deploy."""

from __future__ import annotations

import typer

from modelfleet.deployer.cli._common import (
    OutputFormat,
    OutputOption,
    emit_fields,
    emit_json,
    progress_for,
)
from modelfleet.deployer.docker_images import prepare

app = typer.Typer(
    help="Docker target tooling (offline base image, wheelhouse).", no_args_is_help=True
)


@app.command("base-image")
def base_image(
    base_image: str = typer.Option(
        None, "--base-image", help="check this local image instead of building the default"
    ),
    output: OutputFormat = OutputOption,
) -> None:
    """Build (once, cached) the debootstrap base image, the wheelhouse and the runtime image."""
    prepared = prepare(progress_for(output), base_image=base_image)
    view = {
        "base_image": prepared.base,
        "runtime_image": prepared.runtime,
        "wheelhouse": str(prepared.wheelhouse),
    }
    if output is OutputFormat.json:
        emit_json(view)
    else:
        emit_fields(view)
