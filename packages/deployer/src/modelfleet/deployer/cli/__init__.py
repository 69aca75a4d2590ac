"""The `modelfleet` command: thin Typer modules over the deployer library.

User errors (`DeployerError`) print one line plus a hint and exit non-zero;
the traceback appears only with `--debug`.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import typer
from typer.core import TyperGroup

from modelfleet.deployer.cli import docker, fleet, keys, model, registry, service
from modelfleet.deployer.cli.deploy import deploy
from modelfleet.deployer.cli.quickstart import quickstart
from modelfleet.deployer.errors import DeployerError

_state = {"debug": False}


class _Group(TyperGroup):
    """Turns library errors into one clear line, for every subcommand."""

    def invoke(self, ctx: Any) -> Any:  # typer's vendored click.Context
        try:
            return super().invoke(ctx)
        except DeployerError as exc:
            if _state["debug"]:
                traceback.print_exc()
            typer.echo(f"error: {exc}", err=True)
            if exc.hint:
                typer.echo(f"hint: {exc.hint}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    help="modelfleet: register models, deploy them to the cloud and to devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="show tracebacks and debug logs"),
) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s %(message)s",
    )


app.add_typer(model.app, name="model")
app.add_typer(registry.app, name="registry")
app.add_typer(service.app, name="service")
app.add_typer(keys.app, name="keys")
app.add_typer(docker.app, name="docker")
app.add_typer(fleet.app, name="fleet")
app.command("deploy")(deploy)
# `az ml model deploy -m NAME:VER -n SERVICE -ic ... -dc ...` translates word for word.
model.app.command("deploy", help="Same as `modelfleet deploy` (az ml model deploy).")(deploy)
app.command("quickstart")(quickstart)


def main() -> None:
    app()


__all__ = ["app", "main"]
