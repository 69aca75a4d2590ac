"""The Docker deployment target: one container per service on the local engine.

Images are built offline (see `modelfleet.deployer.docker_images`), published
on 127.0.0.1 with the deployment's cpu/memory limits. The service workdir is
bind-mounted read-only, so rotating keys there (atomic rename) reaches the
server with no restart. `update` hot-swaps: the new release is copied into
the running container, loaded and warmed beside the old one through the
server's admin endpoint, and only then does traffic move; the rebuilt image
is recorded so a recreated container starts on the new version.
numReplicas N runs the container's server as `serve --workers N`: N worker
processes in the one container, sharing its cpu/memory limits; the admin load
of an update reaches their supervisor, which swaps every worker (two phases).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelfleet.deployer import docker_images as images
from modelfleet.deployer import wheelhouse
from modelfleet.deployer.errors import DeploymentError
from modelfleet.deployer.targets import scoring_admin
from modelfleet.deployer.targets.base import (
    Progress,
    ServiceRecord,
    ServiceSpec,
    ServiceStatus,
    updated_record,
)
from modelfleet.deployer.targets.service_files import (
    ADMIN_KEY_FILE,
    check_entry_script,
    free_port,
    write_admin_key,
    write_keys,
)

log = logging.getLogger(__name__)

WORKDIR_IN_CONTAINER = "/var/modelfleet/service"
LABEL_SERVICE = "modelfleet.service"
LABEL_TARGET = "modelfleet.target"
# In the service workdir: every service image a deploy or an update of this
# service built or chose, written before the build starts, so a CLI killed
# before it recorded the image (or started a container) leaves it findable.
IMAGES_FILE = "docker-images"
# `docker stop` grace: the server stops its workers and exits well within it.
STOP_TIMEOUT_S = 10
LAST_LOG_LINES = 20
READY_TIMEOUT_ENV = "MODELFLEET_DOCKER_READY_TIMEOUT"
DEFAULT_READY_TIMEOUT_S = 120.0


class DockerTargetError(DeploymentError):
    """A Docker deployment failed; the message says which step and why."""


def ready_timeout() -> float:
    """Seconds to wait for a container (deploy) or a new version (update) to be ready.

    Read when used, so a changed environment is honoured by a long-lived caller.
    """
    raw = os.environ.get(READY_TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_READY_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise DockerTargetError(
            f"{READY_TIMEOUT_ENV}={raw!r} is not a number of seconds above 0",
            hint=f"set it to e.g. 300, or unset it for the default ({DEFAULT_READY_TIMEOUT_S:.0f})",
        )
    return value


class DockerTarget:
    """`DeploymentTarget` for a local Docker engine."""

    name = "docker"

    def __init__(self, client: Any | None = None) -> None:
        self._client = client

    # ------------------------------------------------------------------ engine

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = images.connect()
        return self._client

    # ------------------------------------------------------------------ images

    def build(
        self,
        spec: ServiceSpec,
        progress: Progress,
        *,
        environment: tuple[str, str, str] | None = None,
    ) -> tuple[str, images.Release, bool]:
        """Build (or reuse) the service image for `spec`: (tag, release, built).

        With `environment` (base image id, user requirements key, extra steps
        key), refuse before building anything when `spec` needs a different one.
        """
        check_entry_script(spec, DockerTargetError)
        client = self.client
        extra = images.load_extra_steps(
            spec.inference.extra_dockerfile_steps, spec.inference.source_directory
        )
        base = images.resolve_base_image(client, spec.inference.base_image, progress)
        reqs = wheelhouse.user_requirements(
            spec.inference.requirements_file, spec.inference.conda_file
        )
        wanted = (
            client.images.get(base).id,
            wheelhouse.requirements_key(reqs) if reqs else "none",
            images.extra_steps_key(extra),
        )
        if environment is not None and wanted != environment:
            changed = (
                "base image"
                if wanted[0] != environment[0]
                else "pip requirements"
                if wanted[1] != environment[1]
                else "extraDockerfileSteps (or the source files its COPY steps read)"
            )
            raise DockerTargetError(
                f"the update changes the {changed}, which a running container cannot take "
                "without a restart; the service keeps its current version",
                hint=f"delete the service and deploy it again (modelfleet service delete {spec.name})",
            )
        scoring = wheelhouse.scoring_wheelhouse(progress)
        user = wheelhouse.requirements_wheelhouse(reqs, progress) if reqs else None
        runtime = images.ensure_runtime_image(client, base, scoring, user, progress)
        release = images.stage_release(
            spec.workdir,
            [images.ModelSource(m.name, m.version, m.path, m.framework) for m in spec.models],
            spec.inference.source_directory,
            spec.inference.entry_script,
            spec.name,
        )
        tag, built = images.ensure_service_image(
            client,
            runtime,
            release,
            progress,
            extra=extra,
            before_build=lambda image: _remember_image(spec.workdir, image),
        )
        return tag, release, built

    # ------------------------------------------------------------------ lifecycle

    def deploy(self, spec: ServiceSpec, progress: Progress) -> ServiceRecord:
        import docker.errors

        timeout = ready_timeout()  # a bad value fails before anything is built
        client = self.client
        container_name = _container_name(spec.name)
        try:
            client.containers.get(container_name)
        except docker.errors.NotFound:
            pass
        else:
            raise DockerTargetError(
                f"a container named {container_name} already exists; "
                f"delete the service first (modelfleet service delete {spec.name})"
            )
        note = scaling_note(spec)
        if note:
            progress(note)
        tag, release, _built = self.build(spec, progress)
        port = spec.deployment.port or free_port()
        try:
            keys_file = write_keys(spec, spec.workdir)
            admin_key_file = write_admin_key(spec.workdir)
            _give_to_server(spec.workdir, [keys_file, admin_key_file])
            progress(f"starting container {container_name} on 127.0.0.1:{port}")
            container = self._run(spec, tag, port, keys_file)
            _wait_ready(container, port, progress, timeout)
        except BaseException:
            # Nothing half-created: no container, and no image only this attempt used.
            self._cleanup_failed_start(spec.name)
            images.remove_image_if_unused(client, tag)
            raise
        progress(f"{spec.name} is ready at http://127.0.0.1:{port}/score")
        log.info(
            "docker deploy service=%s container=%s image=%s port=%d",
            spec.name, container.short_id, tag, port,
        )  # fmt: skip
        return ServiceRecord(
            name=spec.name,
            target=self.name,
            state="healthy",
            scoring_uri=f"http://127.0.0.1:{port}/score",
            swagger_uri=f"http://127.0.0.1:{port}/swagger.json",
            models=[f"{m.name}:{m.version}" for m in spec.models],
            target_data={
                "container_id": container.id,
                "container_name": container_name,
                "image": tag,
                "images": [tag],  # every image this service ran or may restart from
                "release": release.id,
                "port": port,
                "workdir": str(spec.workdir),
                "keys_file": str(keys_file) if keys_file else None,
                "admin_key_file": str(spec.workdir / ADMIN_KEY_FILE),
                "workers": spec.deployment.replicas,
                "note": note or None,
            },
        )

    def update(self, record: ServiceRecord, spec: ServiceSpec, progress: Progress) -> ServiceRecord:
        timeout = ready_timeout()  # a bad value fails before anything is built
        container = self._container(record)
        data = dict(record.target_data)
        running = _runtime_of(self.client, str(data["image"]))
        tag, release, _built = self.build(
            spec,
            progress,
            environment=_environment(self.client, str(data["image"]), running) if running else None,
        )
        if release.id == data.get("release") and tag == data.get("image"):
            progress("nothing changed; the service keeps its current version")
            return record
        try:
            self._hot_swap(container, data, tag, release, progress, timeout)
        except BaseException:
            if tag not in (data.get("images") or [data.get("image")]):
                images.remove_image_if_unused(self.client, tag)
            raise
        progress(
            f"{spec.name} now serves {', '.join(f'{m.name}:{m.version}' for m in spec.models)}"
        )
        log.info("docker update service=%s image=%s release=%s", spec.name, tag, release.id)
        data.update(image=tag, release=release.id)
        # Keep the image the container runs and the new one; images of versions in
        # between serve nothing any more.
        started_from = str(container.attrs.get("Config", {}).get("Image", ""))
        kept: list[str] = []
        for old in data.get("images", []):
            if old in (tag, started_from) or not images.remove_image_if_unused(self.client, old):
                kept.append(old)
        data["images"] = [*[i for i in kept if i != tag], tag]
        return updated_record(record, spec, data)

    def _hot_swap(
        self,
        container: Any,
        data: dict[str, Any],
        tag: str,
        release: images.Release,
        progress: Progress,
        timeout: float,
    ) -> None:
        """Copy `release` into the running container, load and warm it, then switch."""
        running = _runtime_of(self.client, str(data["image"]))
        wanted = _runtime_of(self.client, tag)
        if running.get("id") != wanted.get("id"):
            # Only modelfleet-scoring itself changed: the running server can still load
            # the new release; the new image carries the new package for the next start.
            progress(
                "the running container keeps its modelfleet-scoring; the new image has the newer one"
            )
        progress(f"copying release {release.id} into {data['container_name']}")
        try:
            with release.tar() as archive:
                container.put_archive(images.RELEASES_DIR, archive)
        except Exception as exc:
            raise DockerTargetError(
                f"cannot copy the new release into the container: {exc}"
            ) from exc
        progress(f"loading {release.model_name}:{release.model_version} beside the running version")
        admin_key = (Path(data["workdir"]) / ADMIN_KEY_FILE).read_text().strip()

        def drop_staged_release() -> None:
            if release.id != data.get("release"):
                container.exec_run(["rm", "-rf", f"{images.RELEASES_DIR}/{release.id}"])

        scoring_admin.load_beside(
            int(data["port"]),
            admin_key,
            release.model_name,
            {
                "model_dir": release.model_dir,
                "entry_script": release.entry_script,
                "version": release.model_version,
            },
            timeout=timeout,
            error=DockerTargetError,
            on_refused=drop_staged_release,
        )
        # Traffic is on the new version; make a restart of this container start there too.
        container.exec_run(["ln", "-sfn", f"releases/{release.id}", images.CURRENT_LINK])
        if data.get("release") and data["release"] != release.id:
            container.exec_run(["rm", "-rf", f"{images.RELEASES_DIR}/{data['release']}"])

    def status(self, record: ServiceRecord) -> ServiceStatus:
        import docker.errors

        try:
            container = self._container(record)
        except DockerTargetError as exc:
            return ServiceStatus("failed", str(exc))
        try:
            container.reload()
        except docker.errors.NotFound:
            return ServiceStatus("failed", "the container no longer exists")
        state = container.attrs.get("State", {})
        if state.get("Running") and not state.get("Restarting"):
            port = int(record.target_data["port"])
            if _is_ready(port):
                return ServiceStatus("healthy", f"container {container.short_id} running")
            return ServiceStatus("creating", "container running, scoring server not ready yet")
        detail = f"container {state.get('Status', 'unknown')}"
        if state.get("ExitCode"):
            detail += f" (exit code {state['ExitCode']})"
        if state.get("Error"):
            detail += f": {state['Error']}"
        return ServiceStatus("failed", detail, _last_lines(container))

    def logs(self, record: ServiceRecord, follow: bool) -> Iterator[str]:
        container = self._container(record)
        pending = b""
        for chunk in container.logs(stream=True, follow=follow, stdout=True, stderr=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode(errors="replace")
        if pending:
            yield pending.decode(errors="replace")

    def delete(self, record: ServiceRecord, progress: Progress) -> None:
        """Remove the container and the service's images (base, deps and runtime images
        stay cached), and untagged images that earlier modelfleet builds left behind."""
        import docker.errors

        client = self.client
        name = str(record.target_data.get("container_name") or _container_name(record.name))
        tags = list(record.target_data.get("images") or [record.target_data.get("image")])
        # A deploy or update killed before it recorded its image, or before a
        # container ran it (a claimed record holds only the workdir).
        tags += _remembered_images(record.target_data.get("workdir"))
        try:
            container = client.containers.get(record.target_data.get("container_id") or name)
        except docker.errors.NotFound:
            progress(f"container {name} is already gone")
        else:
            # A deploy killed before it recorded its image: the container names it.
            ran = str((container.attrs.get("Config") or {}).get("Image") or "")
            if ran.startswith(f"{images.SERVICE_REPO}:"):
                tags.append(ran)
            progress(f"stopping container {name}")
            _stop_container(container)
            _remove_container(container)
        # Service images go with the service (unless another service uses the same
        # content); base and runtime images stay cached for the next build.
        log.info("docker delete service=%s container=%s", record.name, name)
        for image in dict.fromkeys(filter(None, tags)):
            if images.remove_image_if_unused(client, str(image)):
                progress(f"removed image {image}")
        # Builds leave no untagged image now; this clears what earlier ones left.
        leftovers = images.prune_build_leftovers(client)
        if leftovers:
            progress(f"removed {len(leftovers)} untagged images left by earlier builds")

    # ------------------------------------------------------------------ internals

    def _run(self, spec: ServiceSpec, tag: str, port: int, keys_file: Path | None) -> Any:
        import docker.errors

        d = spec.deployment
        workdir = spec.workdir.resolve()
        command = [
            "--admin-key-file", f"{WORKDIR_IN_CONTAINER}/{ADMIN_KEY_FILE.as_posix()}",
            "--scoring-timeout-ms", str(d.scoring_timeout_ms),
            "--max-concurrent-requests", str(d.max_concurrent_requests),
            "--workers", str(d.replicas),
            *scoring_admin.load_timeout_args(ready_timeout()),
        ]  # fmt: skip
        if keys_file is not None:
            rel = keys_file.resolve().relative_to(workdir).as_posix()
            command += ["--keys-file", f"{WORKDIR_IN_CONTAINER}/{rel}"]
        try:
            return self.client.containers.run(
                tag,
                command=command,
                name=_container_name(spec.name),
                detach=True,
                init=True,  # signals reach the server; no zombie processes
                ports={f"{images.CONTAINER_PORT}/tcp": ("127.0.0.1", port)},
                nano_cpus=int(d.cpu_cores * 1e9),
                mem_limit=int(d.memory_gb * 1024**3),
                # no swap beyond the limit: a server over budget should fail, not crawl
                memswap_limit=int(d.memory_gb * 1024**3),
                volumes={str(workdir): {"bind": WORKDIR_IN_CONTAINER, "mode": "ro"}},
                labels={
                    LABEL_SERVICE: spec.name,
                    LABEL_TARGET: self.name,
                    "modelfleet.models": ",".join(f"{m.name}:{m.version}" for m in spec.models),
                },
                restart_policy={"Name": "unless-stopped"},
            )
        except docker.errors.APIError as exc:
            self._cleanup_failed_start(spec.name)
            text = str(exc.explanation or exc)
            if "port is already allocated" in text or "address already in use" in text:
                raise DockerTargetError(
                    f"port {port} on 127.0.0.1 is already in use; choose another port "
                    "(deployment config `port`) or leave it unset to pick a free one"
                ) from exc
            raise DockerTargetError(f"cannot start the container: {text}") from exc

    def _cleanup_failed_start(self, service: str) -> None:
        import docker.errors

        with contextlib.suppress(docker.errors.NotFound):
            _remove_container(self.client.containers.get(_container_name(service)))

    def _container(self, record: ServiceRecord) -> Any:
        import docker.errors

        ref = record.target_data.get("container_id") or _container_name(record.name)
        try:
            return self.client.containers.get(ref)
        except docker.errors.NotFound as exc:
            raise DockerTargetError(
                f"the container of service {record.name} no longer exists; "
                f"delete the service and deploy it again"
            ) from exc


# ---------------------------------------------------------------------- helpers


def _give_to_server(workdir: Path, secrets: list[Path | None]) -> None:
    """Make the secrets readable by the container's unprivileged user and nobody else.

    The workdir is bind-mounted, so ownership is by uid: the secrets folder and
    files go to CONTAINER_UID with modes 0700/0600 (the host is root; later
    atomic rewrites keep the owner, see service_files.write_atomic). The
    workdir itself only needs to be traversable.
    """
    uid = images.CONTAINER_UID
    files = [f for f in secrets if f is not None]
    mode = workdir.stat().st_mode
    if mode & 0o001 == 0:
        workdir.chmod(stat.S_IMODE(mode) | 0o001)
    folders = {f.parent for f in files}
    try:
        for path in [*folders, *files]:
            os.chown(path, uid, uid)
    except PermissionError as exc:
        # Not root (a member of the docker group): the files cannot be given away.
        raise DockerTargetError(
            f"cannot hand the service's keys to the container user (uid {uid}): {exc}",
            hint="run the docker target as root, as dockerd does",
        ) from exc
    for folder in folders:
        folder.chmod(0o700)
    for path in files:
        path.chmod(0o600)


def scaling_note(spec: ServiceSpec) -> str:
    """What of the deployment config the docker target does not apply (empty when nothing).

    numReplicas N is applied as `serve --workers N` inside the one container (the
    workers share its cpu/memory limits; an update's load request swaps them all);
    autoScaler is not: the worker count is fixed while the container runs.
    """
    dep = spec.deployment
    if not dep.autoscale_enabled:
        return ""
    return (
        "autoScaler ignored: the docker target runs a fixed number of worker processes "
        f"in one container (numReplicas, here {dep.replicas}), sharing its cpu/memory limits"
    )


def _remember_image(workdir: Path, tag: str) -> None:
    """Note `tag` in the workdir before it is built (see IMAGES_FILE), durably."""
    path = workdir / IMAGES_FILE
    if tag in _remembered_images(str(workdir)):
        return
    with path.open("a") as fh:
        fh.write(f"{tag}\n")
        fh.flush()
        os.fsync(fh.fileno())


def _remembered_images(workdir: object) -> list[str]:
    """The service images IMAGES_FILE names (none when there is no such file)."""
    if not workdir:
        return []
    try:
        text = (Path(str(workdir)) / IMAGES_FILE).read_text()
    except OSError:
        return []
    prefix = f"{images.SERVICE_REPO}:"
    # Only service images: the file is plain text in a folder the user can edit.
    return [line.strip() for line in text.splitlines() if line.strip().startswith(prefix)]


def _container_name(service: str) -> str:
    return f"modelfleet-{service}"


def _runtime_of(client: Any, image: str) -> dict[str, str]:
    """The runtime image a service image was built on: its id and labels ({} if unknown)."""
    import docker.errors

    try:
        runtime_id = images.image_labels(client, image).get(images.LABEL_RUNTIME, "")
        if not runtime_id:
            return {}
        return {"id": runtime_id, **images.image_labels(client, runtime_id)}
    except docker.errors.ImageNotFound:
        return {}


def _environment(client: Any, image: str, runtime: dict[str, str]) -> tuple[str, str, str]:
    """What a hot-swap cannot change: the base image, the user's pip requirements
    and the image's extraDockerfileSteps."""
    extra = images.image_labels(client, image).get(images.LABEL_EXTRA_STEPS, "none")
    return runtime.get(images.LABEL_BASE, "?"), runtime.get(images.LABEL_USER_DEPS, "?"), extra


def _is_ready(port: int) -> bool:
    return scoring_admin.is_ready(port, timeout=1.0)


def _wait_ready(container: Any, port: int, progress: Progress, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    progress("waiting for /v2/health/ready")
    while time.monotonic() < deadline:
        container.reload()
        state = container.attrs.get("State", {})
        if (
            not state.get("Running")
            or state.get("Restarting")
            or container.attrs.get("RestartCount")
        ):
            lines = _last_lines(container)
            oom = bool(state.get("OOMKilled"))
            raise DockerTargetError(
                f"the container exited during start (exit code {state.get('ExitCode')}"
                + (", killed for exceeding its memory limit" if oom else "")
                + "); last log lines:\n"
                + "\n".join(lines),
                hint="raise memory_gb (memoryInGB) in the deployment config"
                if oom
                else "fix the error in the log lines above and deploy again",
            )
        if _is_ready(port):
            return
        time.sleep(0.2)
    lines = _last_lines(container)
    raise DockerTargetError(
        f"the scoring server was not ready after {timeout:.0f}s; last log lines:\n"
        + "\n".join(lines),
        hint=f"raise {READY_TIMEOUT_ENV} (seconds) for a slow init()",
    )


def _last_lines(container: Any) -> tuple[str, ...]:
    try:
        raw = container.logs(tail=LAST_LOG_LINES, stdout=True, stderr=True)
    except Exception:  # the container may be gone already; status must still answer
        return ()
    return tuple(raw.decode(errors="replace").splitlines()[-LAST_LOG_LINES:])


def _stop_container(container: Any) -> None:
    """`docker stop`: SIGTERM to the server (tini, PID 1, forwards it), which lets
    in-flight requests finish and stops its workers; SIGKILL only after the grace."""
    import docker.errors

    t = time.monotonic()
    try:
        container.stop(timeout=STOP_TIMEOUT_S)
    except docker.errors.NotFound:
        return
    except docker.errors.APIError as exc:  # removal (force) still follows
        log.warning("docker stop failed container=%s reason=%r", container.short_id, str(exc))
        return
    log.info("docker stop container=%s took=%.2fs", container.short_id, time.monotonic() - t)


def _remove_container(container: Any) -> None:
    import docker.errors

    with contextlib.suppress(docker.errors.NotFound):
        container.remove(force=True, v=True)
