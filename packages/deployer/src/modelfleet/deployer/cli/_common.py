"""Shared CLI plumbing: output format, progress lines, `k=v` parsing, the registry."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import typer

from modelfleet.deployer.errors import DeployerError
from modelfleet.deployer.registry import Registry
from modelfleet.deployer.targets.base import no_progress


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


OutputOption = typer.Option(
    OutputFormat.table, "--output", "-o", help="table for people, json for scripts"
)


def progress(line: str) -> None:
    """Progress goes to stderr so `--output json` keeps stdout machine-readable."""
    typer.echo(f"-> {line}", err=True)


def progress_for(output: OutputFormat) -> Any:
    return progress if output is OutputFormat.table else no_progress


def registry() -> Registry:
    return Registry()


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def emit_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        typer.echo("(none)")
        return
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def emit_fields(data: Mapping[str, Any]) -> None:
    width = max(len(k) for k in data)
    for key, value in data.items():
        typer.echo(f"{key.ljust(width)}  {_cell(value)}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def parse_pairs(values: Sequence[str] | None, option: str) -> dict[str, str]:
    """`--tag k=v` values as a dict; a missing '=' is a user error naming the option."""
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeployerError(f"{option} {item!r} is not KEY=VALUE", hint=f"write {option} k=v")
        out[key] = value
    return out
