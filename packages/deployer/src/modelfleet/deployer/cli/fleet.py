"""`modelfleet fleet ...`: devices, tags, target queries and staged rollouts (thin over `deployer.fleet`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from modelfleet.deployer.cli._common import (
    OutputFormat,
    OutputOption,
    _cell,
    emit_fields,
    emit_json,
    emit_table,
    parse_pairs,
)
from modelfleet.deployer.errors import DeployerError
from modelfleet.deployer.fleet import operations as ops
from modelfleet.deployer.fleet.backends.base import DeviceInfo, FleetBackend
from modelfleet.deployer.fleet.query import check_tag_key, parse_query
from modelfleet.deployer.fleet.rollout import (
    RolloutEngine,
    RolloutSpec,
    check_request_count,
    parse_duration,
    parse_ratio,
    parse_stages,
)
from modelfleet.deployer.fleet.store import FleetStore, Rollout

app = typer.Typer(help="Devices and staged, health-gated model rollouts.", no_args_is_help=True)
device_app = typer.Typer(help="One device: show it, or point it at a model version.", no_args_is_help=True)
rollout_app = typer.Typer(help="Staged rollouts with failure budgets, soak gates and rollback.", no_args_is_help=True)
app.add_typer(device_app, name="device")
app.add_typer(rollout_app, name="rollout")

BrokerOption = typer.Option(
    None, "--broker", help="fleet broker URL, mqtt://host:port (default $MODELFLEET_MQTT_URL or mqtt://127.0.0.1:1883)"
)

PasswordFileOption = typer.Option(
    None,
    "--broker-password-file",
    help="file holding the broker password for the user in the broker URL (default $MODELFLEET_BROKER_PASSWORD)",
)


@contextmanager
def _backend(broker: str | None, rollout: Rollout | None = None, password_file: Path | None = None) -> Iterator[FleetBackend]:
    backend = ops.open_backend(ops.broker_url(broker, rollout, password_file))
    try:
        yield backend
    finally:
        backend.close()


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    delta = max(0.0, time.time() - ts)
    if delta < 120:
        return f"{delta:.0f}s ago"
    if delta < 7200:
        return f"{delta / 60:.0f}m ago"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _device_row(d: DeviceInfo) -> dict[str, Any]:
    return {
        "device": d.device_id,
        "online": "online" if d.online else "offline",
        "last_seen": _ago(d.last_seen),
        "model": d.active,
        "status": d.status,
        "desired": d.desired.key if d.desired else ("(no model)" if d.serves_no_model_desired else None),
        "tags": dict(d.tags),
        "error": f"{d.stage}: {d.reason}" if d.status == "failed" else None,
    }


# ---------------------------------------------------------------- devices


@app.command()
def devices(
    where: str = typer.Option(None, "--where", "-w", help="target condition, e.g. \"tags.site = 'plant-1'\""),
    broker: str = BrokerOption,
    password_file: Path = PasswordFileOption,
    output: OutputFormat = OutputOption,
) -> None:
    """Every known device: tags, online/offline, last seen, model and status, last error."""
    if where:
        parse_query(where)  # a malformed query fails before the broker is contacted
    with _backend(broker, None, password_file) as backend:
        found = ops.list_devices(FleetStore(), backend, where)
    if output is OutputFormat.json:
        emit_json([d.to_dict() for d in found])
    else:
        emit_table([_device_row(d) for d in found], ["device", "online", "last_seen", "model", "status", "desired", "tags", "error"])


@app.command()
def tag(
    device_id: str = typer.Argument(..., metavar="DEVICE"),
    pairs: list[str] = typer.Argument(..., metavar="KEY=VALUE...", help="KEY= (empty) removes a tag"),
    broker: str = BrokerOption,
    password_file: Path = PasswordFileOption,
    output: OutputFormat = OutputOption,
) -> None:
    """Set central tags on a device (they win over the tags the device declares)."""
    tags = parse_pairs(pairs, "tag")
    for key in tags:  # before the broker is contacted
        check_tag_key(key)
    with _backend(broker, None, password_file) as backend:
        info = ops.tag_device(FleetStore(), backend, device_id, tags)
    if output is OutputFormat.json:
        emit_json(info.to_dict())
    else:
        typer.echo(f"{device_id}: " + (", ".join(f"{k}={v}" for k, v in info.tags.items()) or "(no tags)"))


@device_app.command("show")
def device_show(
    device_id: str = typer.Argument(..., metavar="DEVICE"),
    broker: str = BrokerOption,
    password_file: Path = PasswordFileOption,
    output: OutputFormat = OutputOption,
) -> None:
    """Everything known about one device."""
    with _backend(broker, None, password_file) as backend:
        info = ops.get_device(FleetStore(), backend, device_id)
    if output is OutputFormat.json:
        emit_json({**info.to_dict(), "document": info.document()})
    else:
        emit_fields(_device_row(info) | {"desired_version": info.desired_version, "reported_version": info.report_version})


@device_app.command("set")
def device_set(
    device_id: str = typer.Argument(..., metavar="DEVICE"),
    model: str = typer.Option(..., "--model", "-m", help="NAME:VERSION from the registry"),
    artifact_url: str = typer.Option(None, "--artifact-url", help="artifact server base URL devices download from (default $MODELFLEET_ARTIFACT_URL or http://127.0.0.1:8470)"),
    entry_script: str = typer.Option(None, "--entry-script", help="entry script inside a folder model, e.g. score.py"),
    wait: str = typer.Option("30s", "--wait", help="how long to wait for the device's report (0: do not wait)"),
    broker: str = BrokerOption,
    password_file: Path = PasswordFileOption,
    output: OutputFormat = OutputOption,
) -> None:
    """Point one device at a model version (for debugging; rollouts are the normal way)."""
    wait_s = parse_duration(wait, "--wait")
    ref = ops.resolve_model(model, artifact_url, entry_script=entry_script)
    with _backend(broker, None, password_file) as backend:
        info = ops.set_device_model(FleetStore(), backend, device_id, ref, wait_s=wait_s)
    if output is OutputFormat.json:
        emit_json(info.to_dict())
    else:
        # the last report may be about the previous desired state: judge it by our `$version`
        outcome = info.outcome(info.desired_version) if info.desired_version is not None else "pending"
        if outcome == "pending":
            outcome = "pending (device offline)" if not info.online else "pending (no report on it yet)"
        typer.echo(f"{device_id}: desired {ref.key}; {outcome}")


# ---------------------------------------------------------------- rollouts


def _render_status(view: dict[str, Any], output: OutputFormat) -> None:
    if output is OutputFormat.json:
        emit_json(view)
        return
    emit_fields(
        {
            "rollout": view["name"],
            "model": view["model"],
            "target": view["target"],
            "state": view["state"],
            "stage": f"{view['stage']} of {len(view['stages'])}"
            + (f" ({_clock(view)})" if view["state"] in ("running", "paused") else ""),
            "reason": view["reason"],
        }
    )
    for warning in view["warnings"]:
        typer.echo(f"warning: {warning}")
    typer.echo("")
    emit_table(
        [
            {"stage": s["stage"], "percent": f"{s['percent']}%", "devices": s["devices"], "states": s["states"], **_timing(view, s["stage"])}
            for s in view["stages"]
        ],
        ["stage", "percent", "devices", "states", "result", "seconds"],
    )
    notable = [d for d in view["devices"] if d["state"] in ("failed", "timeout", "late", "rolled_back")]
    if notable:
        typer.echo("")
        # a rollback to "(no model)": the device had none before and now serves nothing
        rows = [{**d, "previous": d["previous"] or "(no model)"} for d in notable[:20]]
        emit_table(rows, ["device_id", "stage", "state", "previous", "reason"])
        if len(notable) > 20:
            typer.echo(f"... and {len(notable) - 20} more (see --output json)")


def _clock(view: dict[str, Any]) -> str:
    """Where the current stage stands on its clocks (watched time: pauses are not counted)."""
    if view["phase"] == "soaking":
        return f"soaking, {view['soak_elapsed_s']:.0f}s of {view['soak_s']:g}s"
    return f"deploying, {view['stage_elapsed_s']:.0f}s of the {view['timeout_s']:g}s timeout"


def _timing(view: dict[str, Any], stage: int) -> dict[str, Any]:
    for entry in view["stage_log"]:
        if entry["stage"] == stage:
            return {"result": entry["result"], "seconds": entry["seconds"]}
    return {}


def _progress_printer(output: OutputFormat) -> Any:
    last: dict[str, Any] = {}

    def show(r: Rollout) -> None:
        key = (r.state, r.stage, r.phase, len(r.stage_log))
        if output is OutputFormat.table and last.get("key") != key:
            last["key"] = key
            if r.stage_log and (not last.get("logged") or last["logged"] < len(r.stage_log)):
                entry = r.stage_log[-1]
                typer.echo(f"-> stage {entry['stage']} ({entry['percent']}%): {entry['result']} in {entry['seconds']}s", err=True)
                last["logged"] = len(r.stage_log)
            if r.state == "running":
                typer.echo(f"-> stage {r.stage + 1} of {len(r.stages)}: {r.phase}", err=True)

    return show


def _drive_or_detach(store: FleetStore, backend: FleetBackend, name: str, wait: bool, broker: str, output: OutputFormat) -> None:
    if wait:
        final = ops.drive(store, backend, name, on_step=_progress_printer(output))
        _render_status(RolloutEngine(store, backend).status(name), output)
        if final.state in ("failed", "aborted"):
            raise typer.Exit(3)
    else:
        pid = ops.start_detached(name, broker)
        if output is OutputFormat.json:
            emit_json({**RolloutEngine(store, backend).status(name), "controller_pid": pid})
        else:
            typer.echo(f"rollout {name!r} running in the background (pid {pid}); follow it with `modelfleet fleet rollout status {name}`")


@rollout_app.command("create")
def rollout_create(
    name: str = typer.Argument(..., metavar="NAME"),
    model: str = typer.Option(..., "--model", "-m", help="NAME:VERSION from the registry"),
    target: str = typer.Option(..., "--target", "-t", help="target condition, e.g. \"tags.site = 'plant-1'\", or '*'"),
    stages: str = typer.Option("100", "--stages", help="cumulative percentages, e.g. 1,10,50,100"),
    max_failure: str = typer.Option("0%", "--max-failure", help="failed share of a stage's devices tolerated"),
    soak: str = typer.Option("0s", "--soak", help="how long each stage's telemetry must stay healthy"),
    timeout: str = typer.Option("10m", "--timeout", help="per stage: time for devices to report before they count as failed"),
    max_error_rate: str = typer.Option("5%", "--max-error-rate", help="soak gate: share of failed scoring requests"),
    max_p99_ms: float = typer.Option(None, "--max-p99-ms", help="soak gate: p99 scoring latency limit"),
    min_soak_requests: int = typer.Option(
        0, "--min-soak-requests", help="soak gate: requests a stage's devices must serve during the soak (0: none needed)"
    ),
    artifact_url: str = typer.Option(None, "--artifact-url", help="artifact server base URL devices download from (default $MODELFLEET_ARTIFACT_URL or http://127.0.0.1:8470)"),
    entry_script: str = typer.Option(None, "--entry-script", help="entry script inside a folder model, e.g. score.py"),
    wait: bool = typer.Option(False, "--wait", help="drive the rollout in this process until it ends"),
    broker: str = BrokerOption,
    password_file: Path = PasswordFileOption,
    output: OutputFormat = OutputOption,
) -> None:
    """Roll a model version out to the devices matching --target, stage by stage."""
    spec_stages = parse_stages(stages)
    spec_failure = parse_ratio(max_failure, "--max-failure")
    soak_s = parse_duration(soak, "--soak")
    timeout_s = parse_duration(timeout, "--timeout")
    error_rate = parse_ratio(max_error_rate, "--max-error-rate")
    check_request_count(min_soak_requests, "--min-soak-requests")
    parse_query(target)  # a malformed target fails before anything is contacted
    ref = ops.resolve_model(model, artifact_url, entry_script=entry_script)
    url = ops.broker_url(broker, None, password_file)
    spec = RolloutSpec(
        name=name,
        model=ref,
        target=target,
        stages=tuple(spec_stages),
        max_failure=spec_failure,
        soak_s=soak_s,
        timeout_s=timeout_s,
        max_error_rate=error_rate,
        max_p99_ms=max_p99_ms,
        min_soak_requests=min_soak_requests,
        backend=ops.backend_record(url),
    )
    store = FleetStore()
    with _backend(url) as backend:
        r = ops.create_rollout(store, backend, spec)
        if output is OutputFormat.table:
            typer.echo(f"-> rollout {name!r}: {ref.key} to {sum(1 for _ in store.devices(name))} devices in stages {r.stages}", err=True)
        _drive_or_detach(store, backend, name, wait, url, output)


@rollout_app.command("status")
def rollout_status(
    name: str = typer.Argument(..., metavar="NAME"),
    watch: bool = typer.Option(False, "--watch", help="refresh until the rollout stops"),
    broker: str = BrokerOption,
    password_file: Path = PasswordFileOption,
    output: OutputFormat = OutputOption,
) -> None:
    """Progress per stage, the reason of a halt, devices that failed or were rolled back.

    Devices that timed out or were rolled back are looked up on the broker: one that has
    applied the version since is shown as `late`; a rollback the device reported on, as such."""
    store = FleetStore()
    engine = RolloutEngine(store, _NoBackend())
    view = engine.status(name)
    if watch:
        shown: Any = None
        while view["state"] == "running":
            now = (view["stage"], view["phase"], [s["states"] for s in view["stages"]])
            if now != shown and output is OutputFormat.table:
                typer.echo(f"stage {view['stage']} ({view['phase']}): " + "; ".join(f"{s['stage']}: {_cell(s['states'])}" for s in view["stages"]))
                shown = now
            time.sleep(0.5)
            view = engine.status(name)
    # a rolled-back device without a `$version` (rolled back before the database gained
    # confirmations) has nothing to be confirmed by: not looked up
    unknown = sum(
        1
        for d in view["devices"]
        if d["state"] == "timeout"
        or (d["state"] == "rolled_back" and not d["confirmed"] and d["desired_version"] is not None)
    )
    if unknown:
        try:
            with _backend(broker, store.get(name), password_file) as backend:
                ops.check_devices(store, backend, name)
            view = engine.status(name)
        except DeployerError as exc:
            # the stored view is still worth showing; say what could not be checked
            typer.echo(
                f"warning: {unknown} timed-out or rolled-back device(s) not checked on the broker: {exc}", err=True
            )
    _render_status(view, output)


@rollout_app.command("list")
def rollout_list(output: OutputFormat = OutputOption) -> None:
    """Every rollout, newest last."""
    store = FleetStore()
    rows = []
    for r in store.all():
        counts = store.counts(r.name)
        total = sum(sum(c.values()) for c in counts.values())
        applied = sum(c.get("applied", 0) + c.get("late", 0) for c in counts.values())
        rows.append(
            {
                "name": r.name,
                "model": r.model.key,
                "state": r.state,
                "stage": f"{r.stage + 1}/{len(r.stages)}",
                "devices": total,
                "applied": applied,
                "target": r.target,
                "reason": r.reason,
            }
        )
    if output is OutputFormat.json:
        emit_json(rows)
    else:
        emit_table(rows, ["name", "model", "state", "stage", "devices", "applied", "target", "reason"])


@rollout_app.command("pause")
def rollout_pause(name: str = typer.Argument(..., metavar="NAME"), output: OutputFormat = OutputOption) -> None:
    """Stop moving devices; what is in flight finishes. `resume` continues."""
    r = RolloutEngine(FleetStore(), _NoBackend()).pause(name)
    _done(r, output)


@rollout_app.command("resume")
def rollout_resume(
    name: str = typer.Argument(..., metavar="NAME"),
    wait: bool = typer.Option(False, "--wait", help="drive the rollout in this process until it ends"),
    broker: str = BrokerOption,
    password_file: Path = PasswordFileOption,
    output: OutputFormat = OutputOption,
) -> None:
    """Continue a paused rollout, or one whose controlling process died."""
    store = FleetStore()
    r = store.get(name)
    url = ops.broker_url(broker, r, password_file)
    engine = RolloutEngine(store, _NoBackend())
    with engine.lease(name):  # a live controller: say so, rather than start one that exits at once
        pass
    engine.resume(name)
    with _backend(url) as backend:
        _drive_or_detach(store, backend, name, wait, url, output)


@rollout_app.command("abort")
def rollout_abort(name: str = typer.Argument(..., metavar="NAME"), output: OutputFormat = OutputOption) -> None:
    """Stop for good; devices keep the version they have (use `rollback` to undo)."""
    _done(RolloutEngine(FleetStore(), _NoBackend()).abort(name), output)


@rollout_app.command("rollback")
def rollout_rollback(
    name: str = typer.Argument(..., metavar="NAME"),
    broker: str = BrokerOption,
    password_file: Path = PasswordFileOption,
    output: OutputFormat = OutputOption,
) -> None:
    """Put every device the rollout touched back on its previous version."""
    store = FleetStore()
    with _backend(broker, store.get(name), password_file) as backend:
        r = RolloutEngine(store, backend).rollback(name)
    _done(r, output)


def _done(r: Rollout, output: OutputFormat) -> None:
    if output is OutputFormat.json:
        emit_json({"name": r.name, "state": r.state, "reason": r.reason})
    else:
        typer.echo(f"rollout {r.name!r}: {r.state}" + (f" ({r.reason})" if r.reason else ""))


class _NoBackend:
    """For commands that only touch persisted state: any device access is a bug."""

    def _nope(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this command does not reach devices")

    devices = device = set_desired = telemetry = changed = wait = _nope

    def close(self) -> None:
        pass
