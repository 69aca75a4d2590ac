"""Service lifecycle over any target: deploy, update, status, logs, keys, call, delete.

The library behind `modelfleet deploy` / `modelfleet service ...` and the
quickstart. Service state lives in the registry database, so every shell
sees the same services; a name is claimed ("creating") before anything is
started and released again if the deployment fails, so a failed deploy
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import httpx

from modelfleet.deployer.config import (
    check_key,
    deployment_from_jsonable,
    inference_from_jsonable,
    to_jsonable,
)
from modelfleet.deployer.errors import ConfigError, DeployerError, ServiceCallError
from modelfleet.deployer.registry import Registry
from modelfleet.deployer.targets import get_target
from modelfleet.deployer.targets.base import (
    DeploymentConfig,
    InferenceConfig,
    Progress,
    ServiceRecord,
    ServiceSpec,
    ServiceStatus,
    no_progress,
)
from modelfleet.deployer.targets.service_files import write_atomic

log = logging.getLogger(__name__)
_SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
KeyName = Literal["primary", "secondary"]


@dataclass(frozen=True)
class CallResult:
    status_code: int
    body: Any  # parsed JSON when the answer is JSON, text otherwise
    model_version: str | None
    elapsed_ms: float


def validate_service_name(name: str) -> None:
    if not _SERVICE_NAME.match(name):
        raise DeployerError(
            f"invalid service name {name!r}",
            hint="use 1-63 lowercase letters, digits or '-', starting and ending with a "
            "letter or digit",
        )


class ServiceManager:
    """Deployed services of one registry."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry if registry is not None else Registry()

    # ------------------------------------------------------------------ create / change

    def deploy(
        self,
        name: str,
        model_ids: Sequence[str],
        inference: InferenceConfig,
        deployment: DeploymentConfig,
        target: str = "local",
        progress: Progress = no_progress,
    ) -> ServiceRecord:
        validate_service_name(name)
        if not model_ids:
            raise DeployerError("no model given", hint="pass --model NAME:VERSION (-m)")
        impl = get_target(target)  # unknown target: fail before claiming the name
        models = [self.registry.resolve(m) for m in model_ids]
        config = {
            "inference": to_jsonable(inference),
            "deployment": to_jsonable(deployment),
        }
        workdir = self.registry.service_workdir(name)
        stale = self.registry.reserve_service(
            name,
            target,
            config,
            models=[m.key for m in models],
            target_data={"workdir": str(workdir.resolve())},
        )
        record: ServiceRecord | None = None
        try:
            if stale is not None:
                # A deploy of this name whose CLI was killed: stop what it may have started.
                progress(f"cleaning up an interrupted deploy of {name}")
                self._cleanup_interrupted(stale)
            shutil.rmtree(workdir, ignore_errors=True)  # leftovers of a crashed CLI
            workdir.mkdir(parents=True)
            progress(f"deploying {', '.join(m.key for m in models)} as {name} ({target})")
            bindings = tuple(self.registry.binding(m) for m in models)
            spec = ServiceSpec(name, bindings, inference, deployment, workdir)
            record = impl.deploy(spec, progress)
            self.registry.save_service(record)
        except BaseException as exc:
            log.info("event=deploy_failed service=%s target=%s reason=%r", name, target, str(exc))
            if record is not None:  # running but not recorded (e.g. Ctrl-C): stop it
                try:
                    impl.delete(record, no_progress)
                except Exception as cleanup_exc:
                    log.warning("event=deploy_cleanup_failed service=%s reason=%r",
                                name, str(cleanup_exc))
            self.registry.forget_service(name)
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        log.info("event=deployed service=%s target=%s models=%s", name, target, record.models)
        return record

    @staticmethod
    def _cleanup_interrupted(stale: ServiceRecord) -> None:
        try:
            get_target(stale.target).delete(stale, no_progress)
        except DeployerError as exc:
            log.warning("event=interrupted_cleanup_failed service=%s reason=%r", stale.name, str(exc))

    def update(
        self,
        name: str,
        model_ids: Sequence[str],
        inference: InferenceConfig | None = None,
        progress: Progress = no_progress,
    ) -> ServiceRecord:
        config = self.registry.service_config(name)
        inf = inference or inference_from_jsonable(config.get("inference", {}))
        dep = deployment_from_jsonable(config.get("deployment", {}))
        record = self.registry.get_service(name)
        models = [self.registry.resolve(m) for m in (model_ids or record.models)]
        record, interrupted = self.registry.begin_operation(
            name, "update", models=[m.key for m in models]
        )
        if interrupted is not None:
            progress(f"taking over ({interrupted.interrupted_detail()})")
        try:
            bindings = tuple(self.registry.binding(m) for m in models)
            spec = ServiceSpec(name, bindings, inf, dep, self.registry.service_workdir(name))
            updated = get_target(record.target).update(record, spec, progress)
        except BaseException:
            self.registry.end_operation(name, record.state)
            raise
        config["inference"] = to_jsonable(inf)
        self.registry.save_service(updated, config)
        log.info("event=updated service=%s models=%s", name, updated.models)
        return updated

    def delete(self, name: str, progress: Progress = no_progress, *, force: bool = False) -> ServiceRecord:
        """Stop the service and forget it; `force` forgets it even if stopping fails."""
        record, interrupted = self.registry.begin_operation(
            name, "delete", take_over_remote=force
        )
        if interrupted is not None:
            progress(f"taking over ({interrupted.interrupted_detail()})")
        try:
            get_target(record.target).delete(record, progress)
        except DeployerError as exc:
            if not force:
                self.registry.end_operation(name, "failed")
                force_hint = f"`modelfleet service delete {name} --force` forgets it anyway"
                exc.hint = f"{exc.hint}; {force_hint}" if exc.hint else force_hint
                raise
            progress(f"could not stop {name} ({exc}); forgetting it anyway (--force)")
        except BaseException:
            self.registry.end_operation(name, "failed")
            raise
        shutil.rmtree(self.registry.service_workdir(name), ignore_errors=True)
        self.registry.forget_service(name)
        log.info("event=deleted service=%s target=%s", name, record.target)
        progress(f"deleted {name}")
        return record

    # ------------------------------------------------------------------ inspect

    def get(self, name: str) -> ServiceRecord:
        return self.registry.get_service(name)

    def status(self, name: str) -> tuple[ServiceRecord, ServiceStatus]:
        """Probe the service; a dead process or container is stored as failed.

        A service whose deploy/update/delete is running shows that operation; one
        whose operation died with its CLI shows as failed, saying so.
        """
        record, running = self.registry.get_service_operation(name)
        if running is not None:
            if running.is_alive():
                return record, ServiceStatus(record.state, running.busy_message(name))
            lines: tuple[str, ...] = ()
            if record.scoring_uri:  # deployed once: the target can show its last log lines
                with contextlib.suppress(DeployerError):
                    lines = get_target(record.target).status(record).last_log_lines
            return replace(record, state="failed"), ServiceStatus(
                "failed", running.interrupted_detail(), lines
            )
        status = get_target(record.target).status(record)
        # Stored only if no operation started meanwhile (it owns the state now).
        if status.state != record.state and self.registry.set_service_state(
            name, status.state, was=record.state
        ):
            record = replace(record, state=status.state)
        return record, status

    def list(self) -> list[tuple[ServiceRecord, ServiceStatus]]:
        return [self.status(r.name) for r in self.registry.list_services()]

    def logs(self, name: str, follow: bool = False) -> Iterator[str]:
        record = self.registry.get_service(name)
        return get_target(record.target).logs(record, follow)

    # ------------------------------------------------------------------ keys

    def _keys_file(self, record: ServiceRecord) -> Path:
        keys_file = record.target_data.get("keys_file")
        if not keys_file:
            raise DeployerError(
                f"service {record.name!r} has authentication disabled, so it has no keys",
                hint="deploy it with authEnabled: true (the default) to use keys",
            )
        return Path(keys_file)

    def keys(self, name: str) -> dict[str, str]:
        path = self._keys_file(self.registry.get_service(name))
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DeployerError(f"cannot read the keys of {name}: {exc}") from exc
        keys: dict[str, str] = {}
        for which in ("primary", "secondary"):
            value = data.get(which) if isinstance(data, dict) else None
            if not isinstance(value, str) or not value:
                raise DeployerError(
                    f"the keys file of {name} ({path}) has no {which} key",
                    hint='rewrite it as {"primary": "...", "secondary": "..."}, '
                    "or deploy the service again",
                )
            keys[which] = value
        return keys

    def regen_key(self, name: str, which: KeyName, value: str | None = None) -> dict[str, str]:
        if which not in ("primary", "secondary"):
            raise DeployerError(
                f"unknown key {which!r}", hint="use --key primary or --key secondary"
            )
        record = self.registry.get_service(name)
        path = self._keys_file(record)
        # Read-modify-write under a lock beside the file: two regen-key at once
        # (primary and secondary) would otherwise each write back the other's old key.
        with _file_lock(path.with_name(path.name + ".lock")):
            keys = self.keys(name)
            if value is not None:
                value = check_key("--value", value)
                other = "secondary" if which == "primary" else "primary"
                if value == keys[other]:
                    raise ConfigError(f"--value is the {other} key; the two keys must differ")
            keys[which] = value or secrets.token_urlsafe(32)
            # Atomic rename: the server re-reads the file on its next mtime check.
            write_atomic(path, json.dumps(keys))
        return keys

    # ------------------------------------------------------------------ call

    def call(
        self,
        name: str,
        body: bytes,
        *,
        content_type: str = "application/json",
        key: str | None = None,
        use_auth: bool = True,
        timeout: float = 60.0,
    ) -> CallResult:
        record = self.registry.get_service(name)
        if not record.scoring_uri:
            raise ServiceCallError(f"service {name!r} has no scoring URI (state {record.state})")
        headers = {"Content-Type": content_type}
        if use_auth and record.target_data.get("keys_file"):
            headers["Authorization"] = f"Bearer {key or self.keys(name)['primary']}"
        try:
            response = httpx.post(record.scoring_uri, content=body, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            raise ServiceCallError(
                f"cannot reach {record.scoring_uri}: {exc}",
                hint=f"check the service with `modelfleet service show {name}`",
            ) from exc
        try:
            parsed: Any = response.json()
        except ValueError:
            parsed = response.text
        result = CallResult(
            response.status_code,
            parsed,
            response.headers.get("x-model-version"),
            response.elapsed.total_seconds() * 1000,
        )
        if response.status_code == 401:
            raise ServiceCallError(
                f"{name} refused the call (401): missing or wrong key",
                hint=f"see the keys with `modelfleet service keys {name}`",
            )
        if response.status_code >= 400:
            detail = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
            raise ServiceCallError(f"{name} answered {response.status_code}: {detail}")
        return result


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on `path`, held for the block; waits for another holder."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
