"""`modelfleet keys generate`: an Ed25519 key pair for signing models."""

from __future__ import annotations

from pathlib import Path

import typer

from modelfleet.deployer.cli._common import OutputFormat, OutputOption, emit_json
from modelfleet.deployer.registry.signing import generate_key_pair

app = typer.Typer(help="Model signing keys.", no_args_is_help=True)


@app.command()
def generate(
    out: Path = typer.Option(..., "--out", help="folder for signing-key.pem and .pub.pem"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing key pair"),
    output: OutputFormat = OutputOption,
) -> None:
    """Create a key pair: sign with the private key, give devices the public one."""
    private, public, key_id = generate_key_pair(out, overwrite=force)
    if output is OutputFormat.json:
        emit_json({"private_key": str(private), "public_key": str(public), "key_id": key_id})
        return
    typer.echo(f"private key {private} (keep it secret)")
    typer.echo(f"public key  {public} (give it to devices)")
    typer.echo(f"key id      {key_id}")
