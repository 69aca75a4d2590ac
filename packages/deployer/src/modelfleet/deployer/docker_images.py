"""Images for the Docker target, built with no registry pull.

Four images, each tagged by a hash of what went into it and built only when
that tag is missing; each is a single-stage build, so no build leaves an
untagged image behind:

1. base image: a Debian bookworm minbase root filesystem with Python 3.11 made
   by `debootstrap` on the host and `docker import`-ed (no pull needed);
2. deps image (build-only): base + a venv with the locked dependencies and the
   user's requirements, installed from a host-built wheelhouse with `--no-index`;
3. runtime image: base + the deps image's venv + modelfleet-scoring itself;
4. service image: runtime + the user's extraDockerfileSteps (if any) + the
   model files + the entry script's source folder + the `serve` command. Its
   tag is the hash of that content, so an unchanged deployment is not rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from modelfleet.deployer.errors import DeploymentError
from modelfleet.deployer.targets import docker_steps
from modelfleet.deployer.targets.docker_steps import ExtraSteps
from modelfleet.deployer.wheelhouse import Wheelhouse, cache_root, scoring_wheelhouse

Progress = Callable[[str], None]

BASE_REPO = "modelfleet/base"
DEPS_REPO = "modelfleet/scoring-deps"
RUNTIME_REPO = "modelfleet/scoring-runtime"
SERVICE_REPO = "modelfleet/service"

DEBIAN_SUITE = "bookworm"
DEBIAN_INCLUDE = ("python3", "python3-venv", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Paths inside every service image; the container's view, fixed so that the
# hot-swap (update) can place a new release beside the running one.
APP_ROOT = "/var/modelfleet"
RELEASES_DIR = f"{APP_ROOT}/releases"
CURRENT_LINK = f"{APP_ROOT}/current"
VENV_DIR = "/opt/modelfleet/venv"
CONTAINER_PORT = 5001
# The unprivileged user the scoring server runs as in every service container;
# fixed, so that the host can give it the keys files by uid.
CONTAINER_USER = "modelfleet"
CONTAINER_UID = 10001

LABEL_KIND = "modelfleet.kind"
LABEL_RUNTIME = "modelfleet.runtime"  # on service images: the runtime image id they build on
LABEL_BASE = "modelfleet.base"  # on runtime images: the base image id
LABEL_USER_DEPS = "modelfleet.user-deps"  # on runtime images: the user wheelhouse key
LABEL_DEPS = "modelfleet.deps"  # on runtime images: the deps image id whose venv they copy
LABEL_EXTRA_STEPS = "modelfleet.extra-steps"  # on service images: extraDockerfileSteps key
RUNTIME_IMAGES_KEPT = 3  # per base image
DEPS_IMAGES_KEPT = 1  # per base image, besides the one the newest runtime image used


class ImageBuildError(DeploymentError):
    """An image could not be built; the message carries the failing step."""


def _hash(parts: Iterable[str | bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def _image_exists(client: Any, ref: str) -> bool:
    import docker.errors

    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    return True


def connect() -> Any:
    """A client for the local Docker engine, or a DeploymentError saying how to get one."""
    import docker

    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except Exception as exc:  # any failure to reach the engine reads the same to a user
        raise ImageBuildError(
            f"no Docker engine reachable ({exc.__class__.__name__})",
            hint="start dockerd (./run.sh test starts one) or set DOCKER_HOST",
        ) from exc
    return client


@dataclass(frozen=True)
class PreparedImages:
    base: str
    runtime: str
    wheelhouse: Path


def prepare(
    progress: Progress = lambda _line: None,
    *,
    client: Any | None = None,
    base_image: str | None = None,
) -> PreparedImages:
    """Build (or find cached) the base image, the scoring wheelhouse and the runtime image.

    What `modelfleet docker base-image` runs; a first deploy does the same on its own.
    """
    client = client or connect()
    base = resolve_base_image(client, base_image, progress)
    scoring = scoring_wheelhouse(progress)
    runtime = ensure_runtime_image(client, base, scoring, None, progress)
    return PreparedImages(base, runtime, scoring.path)


# --------------------------------------------------------------------------- base


def _debian_mirror() -> str:
    """The mirror the host's apt uses, so debootstrap reaches what apt reaches."""
    env = os.environ.get("MODELFLEET_DEBIAN_MIRROR")
    if env:
        return env
    for source in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        try:
            text = source.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
            if line.startswith("deb ") and "debian" in line and "security" not in line:
                fields = [f for f in line.split() if not f.startswith("[")]
                if len(fields) >= 2 and fields[1].startswith("http"):
                    return fields[1]
    return DEFAULT_MIRROR


def _debootstrap_binary() -> str:
    found = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists() else None
    )
    if not found:
        raise ImageBuildError(
            "debootstrap is not installed; install it (apt-get install debootstrap) "
            "or pass --base-image with a local image that has python3 and python3-venv"
        )
    return found


def default_base_image_tag() -> str:
    """The tag of the default base image for this machine's inputs (built or not)."""
    key = _hash(["v1", DEBIAN_SUITE, "minbase", ",".join(DEBIAN_INCLUDE), _debian_mirror()])
    return f"{BASE_REPO}:{DEBIAN_SUITE}-py311-{key[:12]}"


def ensure_base_image(client: Any, progress: Progress = lambda _line: None) -> str:
    """Build (once per machine) and return the default base image tag.

    `debootstrap --variant=minbase` into a temporary folder outside the repo,
    then `docker import`; about 45 s the first time, nothing afterwards.
    """
    tag = default_base_image_tag()
    if _image_exists(client, tag):
        progress(f"base image {tag} is cached")
        return tag
    if os.geteuid() != 0:
        raise ImageBuildError(
            "building the base image with debootstrap needs root; run once as root "
            "(modelfleet docker base-image) or pass --base-image"
        )
    debootstrap = _debootstrap_binary()
    work = cache_root() / "base-rootfs"
    work.mkdir(parents=True, exist_ok=True)
    mirror = _debian_mirror()
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        rootfs = Path(tmp) / "rootfs"
        progress(f"debootstrap {DEBIAN_SUITE} minbase from {mirror} (about a minute, once)")
        cmd = [
            debootstrap,
            "--variant=minbase",
            f"--include={','.join(DEBIAN_INCLUDE)}",
            DEBIAN_SUITE,
            str(rootfs),
            mirror,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
            raise ImageBuildError(
                f"debootstrap failed (exit {result.returncode}): " + " | ".join(tail)
            )
        # Trim what a server never needs: apt lists and caches, docs.
        for sub in ["var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"]:
            target = rootfs / sub
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True, exist_ok=True)
        progress(f"docker import -> {tag}")
        _docker_import(client, rootfs, tag)
    progress(f"base image {tag} built")
    return tag


def _docker_import(client: Any, rootfs: Path, tag: str) -> None:
    """`tar -C rootfs -c . | docker import` through the SDK, streamed from a temp file."""
    repo, _, version = tag.partition(":")
    with tempfile.TemporaryFile(dir=rootfs.parent) as fh:
        with tarfile.open(fileobj=fh, mode="w") as tar:
            tar.add(str(rootfs), arcname=".")
        fh.seek(0)
        client.api.import_image_from_data(
            fh,
            repository=repo,
            tag=version,
            changes=[
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ENV LANG=C.UTF-8",
                f'LABEL {LABEL_KIND}="base"',
            ],
        )
    if not _image_exists(client, tag):
        raise ImageBuildError(f"docker import did not produce {tag}")


def resolve_base_image(client: Any, base_image: str | None, progress: Progress) -> str:
    """The configured base image (must exist locally: nothing is pulled) or the default."""
    if base_image is None:
        return ensure_base_image(client, progress)
    if not _image_exists(client, base_image):
        raise ImageBuildError(
            f"base image {base_image!r} is not present in the local Docker engine; "
            "images are never pulled: `docker load` or `docker import` it first"
        )
    return base_image


# ------------------------------------------------------------------------ runtime

# Two images, each tagged, so that no build leaves an untagged image behind (a
# multi-stage build's first stage stays as a dangling image of several hundred
# MB per dependency set): the deps image holds the venv with the locked and the
# user's dependencies and changes rarely; the runtime image copies that venv
# and adds modelfleet-scoring's own, often changing, wheels.
_DEPS_DOCKERFILE = """\
FROM {base}
RUN python3 -m venv {venv}
COPY deps/ /wheels/deps/
RUN {venv}/bin/pip install --no-cache-dir --no-index --progress-bar off \\
    --find-links /wheels/deps -r /wheels/deps/requirements.txt
COPY user/ /wheels/user/
RUN if [ -s /wheels/user/requirements.txt ]; then \\
    {venv}/bin/pip install --no-cache-dir --no-index --progress-bar off \\
    --find-links /wheels/user --find-links /wheels/deps -r /wheels/user/requirements.txt; fi
"""

_RUNTIME_DOCKERFILE = """\
FROM {base}
COPY --from={deps} {venv} {venv}
COPY local/ /tmp/modelfleet-wheels/
RUN if ls /tmp/modelfleet-wheels/*.whl >/dev/null 2>&1; then \\
    {venv}/bin/pip install --no-cache-dir --no-index --no-deps --progress-bar off \\
    /tmp/modelfleet-wheels/*.whl; fi && rm -rf /tmp/modelfleet-wheels
# The server's own user (no login, no password); written directly so that a
# custom base image without useradd works too.
RUN grep -q '^{user}:' /etc/passwd || {{ \\
    echo '{user}:x:{uid}:{uid}:modelfleet scoring server:{app_root}:/usr/sbin/nologin' >> /etc/passwd \\
    && echo '{user}:x:{uid}:' >> /etc/group; }}
ENV PATH={venv}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PYTHONUNBUFFERED=1 \\
    LANG=C.UTF-8
"""


def _deps_key(scoring: Wheelhouse) -> str:
    """The locked dependencies alone (not the local wheels): wheel names pin versions."""
    names = [f"{w.name}:{w.stat().st_size}" for w in sorted(scoring.path.glob("*.whl"))]
    return _hash([scoring.requirements.read_bytes(), *names])


def ensure_deps_image(
    client: Any,
    base: str,
    scoring: Wheelhouse,
    user: Wheelhouse | None,
    progress: Progress = lambda _line: None,
) -> str:
    """Base + a venv with the locked dependencies and the user's requirements, offline."""
    base_id = client.images.get(base).id
    dockerfile = _DEPS_DOCKERFILE.format(base=base_id, venv=VENV_DIR)
    user_key = user.key if user else "none"
    key = _hash(["deps-v1", base_id, _deps_key(scoring), user_key, dockerfile])
    tag = f"{DEPS_REPO}:{key[:16]}"
    if _image_exists(client, tag):
        progress(f"dependencies image {tag} is cached")
        return tag
    progress(f"building dependencies image {tag} (from the wheelhouse, no network)")
    with tempfile.TemporaryFile() as context:
        with tarfile.open(fileobj=context, mode="w") as tar:
            _add_bytes(tar, "Dockerfile", dockerfile.encode())
            for wheel in sorted(scoring.path.glob("*.whl")):
                tar.add(str(wheel), arcname=f"deps/{wheel.name}")
            _add_bytes(tar, "deps/requirements.txt", scoring.requirements.read_bytes())
            if user is not None:
                for wheel in sorted(user.path.glob("*.whl")):
                    tar.add(str(wheel), arcname=f"user/{wheel.name}")
                _add_bytes(tar, "user/requirements.txt", user.requirements.read_bytes())
            else:
                _add_bytes(tar, "user/requirements.txt", b"")
        context.seek(0)
        labels = {LABEL_KIND: "deps", LABEL_BASE: base_id, LABEL_USER_DEPS: user_key}
        build_image(client, context, tag, labels, progress)
    return tag


def ensure_runtime_image(
    client: Any,
    base: str,
    scoring: Wheelhouse,
    user: Wheelhouse | None,
    progress: Progress = lambda _line: None,
) -> str:
    """Base + the deps image's venv + modelfleet-scoring from this checkout, offline."""
    base_id = client.images.get(base).id
    deps = ensure_deps_image(client, base, scoring, user, progress)
    deps_id = client.images.get(deps).id
    dockerfile = _RUNTIME_DOCKERFILE.format(
        base=base_id,
        deps=deps_id,
        venv=VENV_DIR,
        user=CONTAINER_USER,
        uid=CONTAINER_UID,
        app_root=APP_ROOT,
    )
    key = _hash(["runtime-v5", base_id, scoring.key, user.key if user else "", dockerfile])
    tag = f"{RUNTIME_REPO}:{key[:16]}"
    if _image_exists(client, tag):
        progress(f"runtime image {tag} is cached")
        return tag
    progress(f"building runtime image {tag}")
    with tempfile.TemporaryFile() as context:
        with tarfile.open(fileobj=context, mode="w") as tar:
            _add_bytes(tar, "Dockerfile", dockerfile.encode())
            _add_dir(tar, "local")  # empty outside a source checkout
            for wheel in scoring.local_wheels():
                tar.add(str(wheel), arcname=f"local/{wheel.name}")
        context.seek(0)
        labels = {
            LABEL_KIND: "runtime",
            LABEL_BASE: base_id,
            LABEL_USER_DEPS: user.key if user else "none",
            LABEL_DEPS: deps_id,
        }
        build_image(client, context, tag, labels, progress)
    prune_runtime_images(client, keep=tag, base_id=base_id)
    return tag


def prune_runtime_images(
    client: Any, keep: str, base_id: str, newest: int = RUNTIME_IMAGES_KEPT
) -> list[str]:
    """Untag runtime images on `base_id` no container uses, beyond the `newest`
    few, then the dependencies images no longer needed to build one.

    Each change of modelfleet-scoring (or of a user's requirements) makes a new
    runtime image; without this they pile up at a few hundred MB each. Counted
    per base image, so that a service on a custom base does not push out the
    default base's images.
    """
    on_base = f"{LABEL_BASE}={base_id}"
    found = client.images.list(filters={"label": [f"{LABEL_KIND}=runtime", on_base]})
    found.sort(key=lambda img: str(img.attrs.get("Created", "")), reverse=True)
    removed: list[str] = []
    for image in found[newest:]:
        if keep in image.tags or client.containers.list(all=True, filters={"ancestor": image.id}):
            continue
        removed += _untag(client, image)
    # A deps image is only the cache for building a runtime image of the same
    # dependencies again (modelfleet-scoring changed, its dependencies did not):
    # the one the newest runtime image came from stays, and the newest one, so
    # that a build in flight keeps its own. A runtime image holds its own copy of
    # the venv, so removing its deps image does not break it.
    runtimes = client.images.list(filters={"label": [f"{LABEL_KIND}=runtime", on_base]})
    runtimes.sort(key=lambda img: str(img.attrs.get("Created", "")), reverse=True)
    wanted = {str((runtimes[0].labels or {}).get(LABEL_DEPS, ""))} if runtimes else set()
    deps = client.images.list(filters={"label": [f"{LABEL_KIND}=deps", on_base]})
    deps.sort(key=lambda img: str(img.attrs.get("Created", "")), reverse=True)
    for image in deps[DEPS_IMAGES_KEPT:]:
        if image.id not in wanted:
            removed += _untag(client, image)
    return removed


def _untag(client: Any, image: Any) -> list[str]:
    """Remove every tag of `image` (and with the last one its untagged layers)."""
    import docker.errors

    removed: list[str] = []
    for tag in image.tags:
        try:
            client.images.remove(tag)
            removed.append(tag)
        except docker.errors.APIError:
            pass  # in use by a build right now, or already gone
    return removed


# Dangling images this old are no build in flight's intermediate step.
LEFTOVER_MIN_AGE_S = 3600


def prune_build_leftovers(
    client: Any, min_age_s: float = LEFTOVER_MIN_AGE_S, *, label: str = LABEL_KIND
) -> list[str]:
    """Remove dangling images that modelfleet builds left before builds cleaned up
    after themselves (the first stage of the old multi-stage runtime build, the
    steps of failed builds): untagged, unused, built on a modelfleet image (they
    carry its `label`, `modelfleet.kind`) and older than `min_age_s`."""
    import docker.errors

    now = time.time()
    removed: list[str] = []
    for image in client.api.images(filters={"dangling": True, "label": label}):
        if now - float(image.get("Created", now)) < min_age_s:
            continue
        try:
            client.api.remove_image(image["Id"], noprune=False)
            removed.append(str(image["Id"]))
        except docker.errors.APIError:
            pass  # a container or another image still uses it
    return removed


# ------------------------------------------------------------------------ service

# The image's entry point: reads the release that `current` points at, so a
# container restarted after a hot-swap comes back on the swapped-in version.
_LAUNCHER = """\
#!/bin/sh
set -e
RELEASE=$(readlink -f {current})
. "$RELEASE/release.env"
if [ -n "$ENTRY_SCRIPT" ]; then
  set -- --entry-script "$RELEASE/$ENTRY_SCRIPT" "$@"
fi
exec {venv}/bin/python -m modelfleet.scoring serve --host 0.0.0.0 --port {port} \\
  --model-dir "$RELEASE/model" --model-name "$MODEL_NAME" --model-version "$MODEL_VERSION" "$@"
"""

# The server runs as CONTAINER_UID, which owns the release folders: a hot-swap
# copies a release in and moves `current` as that user (docker exec).
_SERVICE_DOCKERFILE = """\
FROM {runtime}
{extra_steps}COPY launch.sh {app_root}/launch.sh
COPY --chown={uid}:{uid} release/ {releases}/{release_id}/
RUN chmod 0755 {app_root}/launch.sh && ln -sfn releases/{release_id} {current} \\
    && chown -h {uid}:{uid} {app_root} {releases} {current}
ENV MODELFLEET_MODEL_DIR={current}/model AZUREML_MODEL_DIR={current}/model
USER {uid}:{uid}
EXPOSE {port}
ENTRYPOINT ["{app_root}/launch.sh"]
"""


@dataclass(frozen=True)
class Release:
    """Model files + entry-script source, staged on the host and named by their hash.

    Inside a container it lives at `RELEASES_DIR/<id>`: `model/` (the model
    directory the server gets), `app/` (the source directory), `release.env`.
    """

    id: str
    path: Path  # the staged folder on the host
    model_name: str
    model_version: str
    entry_script: str | None  # path inside the container, or None (no-code mode)

    @property
    def model_dir(self) -> str:
        return f"{RELEASES_DIR}/{self.id}/model"

    @contextlib.contextmanager
    def tar(self, owner: int = CONTAINER_UID) -> Iterator[IO[bytes]]:
        """The release as a tar whose single top folder is its id (for put_archive),
        spooled through a temporary file so large models are not held in memory.

        Entries belong to `owner`, the server's user, as the image's own release does."""

        def owned(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            normal = _normalise(info)
            if normal is not None:
                normal.uid = normal.gid = owner
                normal.uname = normal.gname = ""
            return normal

        with tempfile.TemporaryFile() as fh:
            with tarfile.open(fileobj=fh, mode="w") as tar:
                tar.add(str(self.path), arcname=self.id, filter=owned)
            fh.seek(0)
            yield fh


@dataclass(frozen=True)
class ModelSource:
    """A model version to place in a release (mirrors targets.base.ModelBinding)."""

    name: str
    version: int
    path: Path
    framework: str


_SKIP_NAMES = {"__pycache__", ".git", ".venv", ".mypy_cache", ".pytest_cache"}


def _copy_model(source: ModelSource, dest: Path) -> None:
    if not source.path.exists():
        raise ImageBuildError(
            f"model file {source.path} of {source.name}:{source.version} is missing"
        )
    dest.mkdir(parents=True, exist_ok=True)
    if source.path.is_dir():
        shutil.copytree(source.path, dest, dirs_exist_ok=True, copy_function=_link_or_copy)
        return
    name = source.path.name
    # A content-addressed blob has no extension; no-code mode finds models by it.
    if not source.path.suffix and source.framework in {"onnx", "tflite"}:
        name = f"model.{source.framework}"
    _link_or_copy(source.path, dest / name)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link a registry artifact (read-only, content-addressed) instead of copying
    gigabytes; copy when the link is impossible (another filesystem)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage_release(
    workdir: Path,
    models: Iterable[ModelSource],
    source_directory: Path | None,
    entry_script: str | None,
    service_name: str,
) -> Release:
    """Copy models and source into `workdir/releases/<id>` (id = hash of the content)."""
    models = list(models)
    if not models:
        raise ImageBuildError("a service needs at least one model")
    root = workdir / "releases"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        model_root = tmp / "model"
        if len(models) == 1:
            _copy_model(models[0], model_root)
            model_name, model_version = models[0].name, str(models[0].version)
        else:
            # Several models: the model dir holds <name>/<version>/, as AZUREML_MODEL_DIR does.
            for m in models:
                _copy_model(m, model_root / m.name / str(m.version))
            model_name = service_name
            model_version = "+".join(f"{m.name}.{m.version}" for m in models)
        script_in_container: str | None = None
        if entry_script is not None:
            app = tmp / "app"
            if source_directory is not None:
                if not source_directory.is_dir():
                    raise ImageBuildError(f"source directory {source_directory} does not exist")
                shutil.copytree(
                    source_directory,
                    app,
                    ignore=lambda _d, names: [n for n in names if n in _SKIP_NAMES],
                )
                script = source_directory / entry_script
            else:
                script = Path(entry_script)
                app.mkdir()
                if script.is_file():
                    shutil.copy2(script, app / script.name)
                entry_script = script.name
            if not script.is_file():
                raise ImageBuildError(
                    f"entry script {entry_script} not found"
                    + (f" in source directory {source_directory}" if source_directory else "")
                )
        # Paths in release.env are relative to the release, so that the id can be
        # the hash of everything, release.env (model name and version) included.
        env = {
            "ENTRY_SCRIPT": f"app/{entry_script}" if entry_script is not None else "",
            "MODEL_NAME": model_name,
            "MODEL_VERSION": model_version,
        }
        (tmp / "release.env").write_text("".join(f"{k}={_sh_quote(v)}\n" for k, v in env.items()))
        release_id = docker_steps.tree_digest(tmp)[:16]
        if entry_script is not None:
            script_in_container = f"{RELEASES_DIR}/{release_id}/app/{entry_script}"
        final = root / release_id
        if final.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Release(release_id, final, model_name, model_version, script_in_container)


def load_extra_steps(path: Path | None, source_directory: Path | None) -> ExtraSteps | None:
    """The inference config's extraDockerfileSteps, checked (None when not set)."""
    if path is None:
        return None
    return docker_steps.load_extra_steps(path, source_directory, skip_names=frozenset(_SKIP_NAMES))


def extra_steps_key(extra: ExtraSteps | None) -> str:
    """What the service image's extra-steps label holds ("none" without steps)."""
    return extra.key[:16] if extra is not None else "none"


def ensure_service_image(
    client: Any,
    runtime: str,
    release: Release,
    progress: Progress = lambda _line: None,
    *,
    extra: ExtraSteps | None = None,
    before_build: Callable[[str], None] = lambda _tag: None,
) -> tuple[str, bool]:
    """Build the service image unless its content-derived tag exists.

    `extra` (extraDockerfileSteps) goes right after FROM: after the runtime and
    the user's requirements, before the release and the entry point, so a new
    model version reuses the steps' cached layers.

    `before_build(tag)` runs once the tag is known, before anything is built or
    reused, so that a caller can note the image where an interrupted run finds it.

    Returns (tag, built): `built` is False when an identical image was reused.
    """
    runtime_id = client.images.get(runtime).id
    launcher = _LAUNCHER.format(current=CURRENT_LINK, venv=VENV_DIR, port=CONTAINER_PORT)
    dockerfile = _SERVICE_DOCKERFILE.format(
        runtime=runtime_id,
        # USER root after the user's steps: they may switch user, the rest needs root.
        extra_steps=f"{extra.dockerfile}USER root\n" if extra is not None else "",
        uid=CONTAINER_UID,
        app_root=APP_ROOT,
        releases=RELEASES_DIR,
        release_id=release.id,
        current=CURRENT_LINK,
        port=CONTAINER_PORT,
    )
    key = _hash(
        ["service-v4", runtime_id, release.id, launcher, dockerfile, extra_steps_key(extra)]
    )
    tag = f"{SERVICE_REPO}:{key[:16]}"
    before_build(tag)
    if _image_exists(client, tag):
        progress(f"image {tag} is up to date (not rebuilt)")
        return tag, False
    progress(f"building image {tag}")
    with tempfile.TemporaryFile() as context:
        with tarfile.open(fileobj=context, mode="w") as tar:
            _add_bytes(tar, "Dockerfile", dockerfile.encode())
            _add_bytes(tar, "launch.sh", launcher.encode(), mode=0o755)
            tar.add(str(release.path), arcname="release", filter=_normalise)
            if extra is not None and extra.source_directory is not None:
                tar.add(
                    str(extra.source_directory), arcname=docker_steps.CONTEXT_DIR, filter=_normalise
                )
        context.seek(0)
        labels = {
            LABEL_KIND: "service",
            "modelfleet.release": release.id,
            LABEL_RUNTIME: runtime_id,
            LABEL_EXTRA_STEPS: extra_steps_key(extra),
        }
        build_image(client, context, tag, labels, progress, describe_step=_extra_step_namer(extra))
    return tag, True


def _extra_step_namer(extra: ExtraSteps | None) -> Callable[[int], str | None]:
    """Maps a build step number back to the extraDockerfileSteps line it came from."""

    def name(step: int) -> str | None:
        # Step 1 is FROM; the extra steps follow it in order.
        if extra is None or not 2 <= step < 2 + len(extra.steps):
            return None
        s = extra.steps[step - 2]
        return f"{docker_steps.FIELD} {extra.path.name} line {s.line}: {s.written}"

    return name


# ------------------------------------------------------------------------ helpers


BUILD_LOG_TAIL = 10  # build output lines shown with a failed step
_STEP = re.compile(r"^Step (\d+)/\d+ : (.*)$")
_STEP_IMAGE = re.compile(r"^---> ([0-9a-f]{12,64})$")  # the image a step committed


def build_image(
    client: Any,
    context: Any,
    tag: str,
    labels: dict[str, str],
    progress: Progress,
    *,
    describe_step: Callable[[int], str | None] = lambda _step: None,
) -> None:
    """`docker build` a prepared tar context, forwarding the build stream as progress.

    The build runs with no network: everything it needs is in the context. A
    failure names the failing step (through `describe_step` when the step came
    from the user) and carries the tail of the build log.
    """
    import docker.errors

    step_no, step_text = 0, ""
    since_step: list[str] = []  # output of the step running now
    created: list[str] = []  # images this build committed (not cache hits, not FROM)
    cached = False

    def failed(detail: str) -> ImageBuildError:
        user_step = describe_step(step_no) if step_no else None
        where = user_step or (f"step {step_no} ({step_text})" if step_no else "the build")
        tail = [line for line in since_step if line != detail][-BUILD_LOG_TAIL:]
        return ImageBuildError(
            f"docker build of {tag} failed at {where}: {detail}"
            + ("\nbuild log tail:\n" + "\n".join(tail) if tail else ""),
            hint="fix that step and deploy again" if user_step else "",
        )

    try:
        stream: Iterator[dict[str, Any]] = client.api.build(
            fileobj=context,
            custom_context=True,
            tag=tag,
            labels=labels,
            rm=True,
            forcerm=True,
            network_mode="none",
            decode=True,
        )
        for chunk in stream:
            if "error" in chunk:
                raise failed(str(chunk.get("error", "")).strip())
            text = str(chunk.get("stream", "")).strip()
            for line in text.splitlines():
                line = line.strip()
                if not line:
                    continue
                match = _STEP.match(line)
                if match:
                    step_no, step_text = int(match.group(1)), match.group(2)
                    since_step, cached = [], False
                elif line == "---> Using cache":
                    cached = True
                else:
                    image = _STEP_IMAGE.match(line)
                    if image and not cached and not step_text.upper().startswith("FROM "):
                        created.append(image.group(1))
                    since_step.append(line)
                progress(line)
    except docker.errors.APIError as exc:
        _remove_dangling(client, created)
        raise failed(str(exc.explanation or exc)) from exc
    except ImageBuildError:
        _remove_dangling(client, created)
        raise


def _remove_dangling(client: Any, images: list[str]) -> None:
    """After a failed build: remove the images its finished steps committed, which
    nothing tags or builds on (the last first, so that each parent is freed)."""
    import docker.errors

    for image in reversed(images):
        try:
            if client.api.inspect_image(image).get("RepoTags"):
                continue
            client.api.remove_image(image, noprune=True)
        except docker.errors.APIError:
            pass  # gone already, or another image builds on it (a concurrent build's cache)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Deterministic, root-owned entries, so content alone decides the build cache."""
    if any(part in _SKIP_NAMES for part in Path(info.name).parts):
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info


def _sh_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def image_labels(client: Any, ref: str) -> dict[str, str]:
    labels = client.images.get(ref).labels or {}
    return {str(k): str(v) for k, v in labels.items()}


def remove_image_if_unused(client: Any, ref: str) -> bool:
    """Remove a service image no container uses (any state); True when removed."""
    import docker.errors

    try:
        image = client.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    users = client.containers.list(all=True, filters={"ancestor": image.id})
    if users:
        return False
    try:
        # By tag: an identical build shared by another service keeps its own tag.
        client.images.remove(ref, force=False, noprune=False)
    except docker.errors.APIError:
        return False  # e.g. still tagged by another service's identical build
    return True
