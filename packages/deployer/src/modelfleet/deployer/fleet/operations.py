"""Fleet operations as library calls: what each `modelfleet fleet ...` command does.

The CLI parses and renders; everything else (opening the backend, merging
central tags, resolving a model through the registry, starting a detached
controller) happens here, so scripts can do the same without the CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from modelfleet.agent.modelref import ModelRefError, ModelVersionRef
from modelfleet.deployer.fleet.backends.base import DeviceInfo, FleetBackend, redact_url
from modelfleet.deployer.fleet.query import check_tag_key, parse_query
from modelfleet.deployer.fleet.rollout import (
    RolloutEngine,
    RolloutSpec,
    merged_devices,
    with_central_tags,
)
from modelfleet.deployer.fleet.store import (
    FleetError,
    FleetStore,
    Rollout,
    RolloutConflictError,
)

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_ARTIFACT_URL = "http://127.0.0.1:8470"


PASSWORD_ENV = "MODELFLEET_BROKER_PASSWORD"


def broker_url(
    explicit: str | None = None, rollout: Rollout | None = None, password_file: Path | None = None
) -> str:
    """The broker URL a command connects with, credentials included.

    Where: --broker, else $MODELFLEET_MQTT_URL, else the rollout's stored connection (URL and
    user name), else the local default. The password, when the URL names a user: the
    --broker-password-file, else the one in the URL, else $MODELFLEET_BROKER_PASSWORD."""
    if explicit:
        url = explicit
    elif os.environ.get("MODELFLEET_MQTT_URL"):
        url = os.environ["MODELFLEET_MQTT_URL"]
    elif rollout is not None and rollout.backend.get("url"):
        url = _with_credentials(str(rollout.backend["url"]), rollout.backend.get("username"), None)
    else:
        url = DEFAULT_BROKER
    from_file = _read_password_file(password_file) if password_file is not None else None
    parts = urlsplit(url)
    if not parts.username:
        if from_file is not None:
            raise FleetError(
                f"--broker-password-file {password_file}: the broker URL {redact_url(url)} names no user",
                hint="give the user in the URL, e.g. --broker mqtt://USER@host:1883",
            )
        return url  # MQTT sends a password only with a user name
    password = from_file or (unquote(parts.password) if parts.password else None) or os.environ.get(PASSWORD_ENV)
    return _with_credentials(url, unquote(parts.username), password or None)


def _read_password_file(path: Path) -> str:
    try:
        # the first line, trimmed: an editor's trailing newline or a comment below is not part of it
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise FleetError(f"--broker-password-file {path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise FleetError(f"--broker-password-file {path}: not a text file") from None
    password = lines[0].strip() if lines else ""
    if not password:
        raise FleetError(
            f"--broker-password-file {path} is empty (on its first line)",
            hint="write the broker password on its first line",
        )
    return password


def _with_credentials(url: str, username: str | None, password: str | None) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    if username:
        auth = quote(username, safe="") + (":" + quote(password, safe="") if password else "")
        host = f"{auth}@{host}"
    return urlunsplit(parts._replace(netloc=host))


def open_backend(url: str) -> FleetBackend:
    """Connect to the fleet backend named by `url` (mqtt:// or mqtts://)."""
    from modelfleet.deployer.fleet.backends.mqtt import MqttFleetBackend, MqttFleetSettings

    return MqttFleetBackend(MqttFleetSettings.from_url(url)).connect()


def backend_record(url: str) -> dict[str, Any]:
    """What a rollout remembers about its backend: the URL and user name, never the password."""
    from modelfleet.deployer.fleet.backends.mqtt import MqttFleetSettings

    settings = MqttFleetSettings.from_url(url)
    record: dict[str, Any] = {"kind": "mqtt", "url": settings.url}
    if settings.username:
        record["username"] = settings.username
    return record


# ---------------------------------------------------------------- devices


def list_devices(store: FleetStore, backend: FleetBackend, where: str | None = None) -> list[DeviceInfo]:
    devices = merged_devices(store, backend)
    if where:
        query = parse_query(where)
        devices = [d for d in devices if query.matches(d.document())]
    return devices


def get_device(store: FleetStore, backend: FleetBackend, device_id: str) -> DeviceInfo:
    info = backend.device(device_id)
    if info is None:
        raise FleetError(
            f"no device {device_id!r} has been seen on the fleet backend",
            hint="devices are known once they connected; see `modelfleet fleet devices`",
        )
    return with_central_tags(info, store.tags())


def tag_device(store: FleetStore, backend: FleetBackend, device_id: str, tags: Mapping[str, str]) -> DeviceInfo:
    """Set central tags (an empty value removes the tag); they win over the device's own."""
    if not tags:
        raise FleetError("no tags given", hint="write e.g. `modelfleet fleet tag DEVICE site=plant-1 hw=rpi4`")
    for key in tags:
        check_tag_key(key)
    get_device(store, backend, device_id)
    store.set_tags(device_id, {k: (v if v != "" else None) for k, v in tags.items()})
    return get_device(store, backend, device_id)


def set_device_model(
    store: FleetStore,
    backend: FleetBackend,
    device_id: str,
    ref: ModelVersionRef,
    *,
    wait_s: float = 0.0,
) -> DeviceInfo:
    """Point one device at a model version (debugging); refused while a rollout holds the device."""
    get_device(store, backend, device_id)
    holder = store.holder(device_id)
    if holder is not None:
        raise RolloutConflictError(
            f"device {device_id!r} is in rollout {holder.name!r} ({holder.state})",
            hint=f"wait for it to finish, or stop it with `modelfleet fleet rollout abort {holder.name}`",
        )
    version = backend.set_desired({device_id: ref})[device_id]
    deadline = time.monotonic() + wait_s
    while True:
        info = backend.device(device_id)
        assert info is not None
        outcome = info.outcome(version)
        if outcome == "failed":
            raise FleetError(f"device {device_id!r} refused {ref.key}: {info.stage}: {info.reason}")
        if outcome == "applied" or time.monotonic() >= deadline:
            return get_device(store, backend, device_id)
        backend.wait(min(0.1, max(0.0, deadline - time.monotonic())))


# ---------------------------------------------------------------- rollouts


def resolve_model(
    model: str, artifact_url: str | None, home: Path | None = None, *, entry_script: str | None = None
) -> ModelVersionRef:
    """`NAME:VERSION` (or `NAME` for the latest) from the registry, as a reference devices download."""
    from modelfleet.deployer.registry.store import Registry, parse_model_id

    name, version = parse_model_id(model)
    registry = Registry(home)
    base = artifact_url or os.environ.get("MODELFLEET_ARTIFACT_URL") or DEFAULT_ARTIFACT_URL
    ref = registry.model_ref(registry.get_model(name, version), base.rstrip("/"))
    if entry_script:
        if ref.format != "tar":
            raise FleetError(
                f"--entry-script needs a folder model; {ref.key} is a single {ref.framework} file",
                hint="register the folder holding the script and the model files",
            )
        try:
            ref = replace(ref, entry_script=entry_script)
        except ModelRefError as exc:  # e.g. an absolute or ../ path: devices would refuse it
            raise FleetError(
                f"--entry-script {entry_script!r}: {exc}",
                hint="give the script's path relative to the registered model folder",
            ) from exc
    return ref


def create_rollout(store: FleetStore, backend: FleetBackend, spec: RolloutSpec) -> Rollout:
    return RolloutEngine(store, backend).create(spec)


def check_devices(store: FleetStore, backend: FleetBackend, name: str) -> None:
    """Look up on the fleet what the stored rollout cannot know: timed-out devices that applied
    its version since (`late`), rolled-back devices that reported on the rollback."""
    engine = RolloutEngine(store, backend)
    engine.converged_late(name)
    engine.confirm_rollbacks(name)


def drive(
    store: FleetStore,
    backend: FleetBackend,
    name: str,
    on_step: Callable[[Rollout], None] | None = None,
) -> Rollout:
    """Run the controller in this process until the rollout finishes, pauses or aborts."""
    return RolloutEngine(store, backend).drive(name, on_step=on_step)


def start_detached(name: str, broker: str) -> int:
    """Drive a rollout from a background process that outlives this one; its pid."""
    log_dir = FleetStore().home / "fleet" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfleet.deployer.fleet", "drive", name],
            # the URL may carry a password: in the environment, not on a command line `ps` shows
            env={**os.environ, "MODELFLEET_MQTT_URL": broker},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the shell that started it does not stop it
        )
    return proc.pid
