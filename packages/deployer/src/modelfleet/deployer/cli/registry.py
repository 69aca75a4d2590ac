"""`modelfleet registry serve`: the HTTP artifact server devices download from."""

from __future__ import annotations

import typer

from modelfleet.deployer.cli._common import OutputFormat, OutputOption, emit_json, registry
from modelfleet.deployer.registry.server import ArtifactServer

app = typer.Typer(help="The model registry's artifact server.", no_args_is_help=True)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8470, "--port", help="port (0 picks a free one)"),
    token: str = typer.Option(
        None, "--token", envvar="MODELFLEET_REGISTRY_TOKEN", help="bearer token (default: random)"
    ),
    public_url: str = typer.Option(
        None, "--public-url", help="base URL devices use, when not http://HOST:PORT"
    ),
    output: OutputFormat = OutputOption,
) -> None:
    """Serve model artifacts over HTTP (token auth, Range requests) until Ctrl-C."""
    server = ArtifactServer(registry(), host=host, port=port, token=token, public_url=public_url)
    server.start()
    if output is OutputFormat.json:
        emit_json({"url": server.url, "token": server.token})
    else:
        typer.echo(f"serving artifacts at {server.url} (Ctrl-C to stop)")
        if token is None:
            typer.echo(f"token: {server.token}")
    server.serve_forever()
