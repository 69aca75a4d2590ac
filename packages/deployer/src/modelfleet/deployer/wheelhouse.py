"""Host-side wheelhouses, so that container builds install with no network.

The scoring runtime's dependencies come from the workspace lockfile
(`uv export`), plus a wheel of the local modelfleet-scoring sources; a user's
requirements (inference config requirements file or conda pip section) go
through the same `pip wheel` step into their own folder. Each folder is keyed
by a hash of its inputs and reused while that hash holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from modelfleet.deployer.errors import DeploymentError

Progress = Callable[[str], None]

SCORING_DIST = "modelfleet-scoring"
SKIPPED_AZUREML = ("azureml-defaults", "azureml-inference-server-http")


class WheelhouseError(DeploymentError):
    """Wheels for a container could not be gathered on the host."""


LOCAL_WHEELS = "local"  # subfolder for wheels built from this checkout (installed --no-deps)


@dataclass(frozen=True)
class Wheelhouse:
    """A folder of wheels plus the requirements file to install from it.

    Wheels built from the local checkout sit in the `local/` subfolder so that
    an image can install the (rarely changing) dependencies in one cached layer
    and the (often changing) local packages in the next.
    """

    path: Path
    key: str  # hash of the inputs; part of the image tags built from it

    @property
    def requirements(self) -> Path:
        return self.path / "requirements.txt"

    def local_wheels(self) -> list[Path]:
        local = self.path / LOCAL_WHEELS
        return sorted(local.glob("*.whl")) if local.is_dir() else []


def cache_root() -> Path:
    """Machine-wide cache for wheelhouses and base-image build scratch space.

    Not under $MODELFLEET_HOME: services of every home (and every test run)
    share the same immutable, hash-keyed folders.
    """
    env = os.environ.get("MODELFLEET_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "modelfleet"


def _digest_tree(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts or not path.is_file() or path.suffix == ".pyc":
            continue
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def find_workspace_root() -> Path | None:
    """The source checkout this deployer runs from (uv.lock + packages/scoring), if any."""
    start = Path(__file__).resolve()
    for parent in start.parents:
        if (parent / "uv.lock").is_file() and (parent / "packages" / "scoring").is_dir():
            return parent
    return None


def _pip_command() -> list[str]:
    """A pip able to download wheels: the deployer's own, else the system python3's.

    The uv-managed venv has no pip; the host's pip carries the machine's index
    configuration (mirrors, certificates), which is what we want here.
    """
    for python in [sys.executable, shutil.which("python3"), shutil.which("python")]:
        if not python:
            continue
        probe = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [python, "-m", "pip"]
    raise WheelhouseError(
        "no pip found to build the container wheelhouse; install pip for python3 "
        "(apt-get install python3-pip)"
    )


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    env = dict(os.environ)
    env.setdefault("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, check=False)
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr or result.stdout).strip().splitlines() if ln.strip()]
        detail = " | ".join(lines[-4:]) if lines else f"exit {result.returncode}"
        raise WheelhouseError(f"{what} failed: {detail}")
    return result.stdout


def _pip_wheel(requirements: Path, dest: Path) -> None:
    # --only-binary is not forced: a user's sdist-only package is built into a
    # wheel here, on the host, where compilers and the network are.
    _run(
        [*_pip_command(), "wheel", "--quiet", "-r", str(requirements), "-w", str(dest)],
        f"pip wheel -r {requirements.name}",
    )


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished folder into the cache (a concurrent build may win)."""
    try:
        tmp.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def scoring_wheelhouse_key(root: Path) -> str:
    """The scoring wheelhouse's key: the lockfile and modelfleet-scoring's sources."""
    lock = (root / "uv.lock").read_bytes()
    scoring_src = root / "packages" / "scoring"
    return hashlib.sha256(
        b"scoring-v1\0" + hashlib.sha256(lock).digest() + _digest_tree(scoring_src).encode()
    ).hexdigest()[:16]


def scoring_wheelhouse(progress: Progress = lambda _line: None) -> Wheelhouse:
    """Wheels of modelfleet-scoring and its locked dependencies."""
    root = find_workspace_root()
    if root is None:
        return _installed_scoring_wheelhouse(progress)
    key = scoring_wheelhouse_key(root)
    final = cache_root() / "wheelhouse" / f"scoring-{key}"
    if (final / "requirements.txt").is_file():
        # Its mtime says when it was last used: the pruning below (in another
        # build) keeps the recently used ones, so a build reading this one now
        # does not lose it.
        with contextlib.suppress(OSError):
            os.utime(final)
        progress(f"wheelhouse {final.name} is cached")
        return Wheelhouse(final, key)
    # on PATH, or where run.sh put it on a system Python that refuses pip installs
    uv = shutil.which("uv") or shutil.which("uv", path=str(root / ".cache" / "bin"))
    if uv is None:
        raise WheelhouseError("uv is needed to export the lockfile (./run.sh quickstart installs it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        progress("exporting the scoring dependencies from uv.lock")
        exported = _run(
            [
                uv,
                "export",
                "--frozen",
                "--package",
                SCORING_DIST,
                "--no-hashes",
                "--no-emit-workspace",
                "--no-dev",
                "--no-header",
                "--no-annotate",
            ],
            "uv export",
            cwd=root,
        )
        deps = tmp / "deps.txt"
        deps.write_text(exported)
        progress("pip wheel: scoring dependencies (once per lockfile)")
        _pip_wheel(deps, tmp)
        progress("building the modelfleet-scoring wheel")
        local = tmp / LOCAL_WHEELS
        _run(
            [
                uv,
                "build",
                "--package",
                SCORING_DIST,
                "--wheel",
                "--out-dir",
                str(local),
                "--quiet",
            ],
            "uv build modelfleet-scoring",
            cwd=root,
        )
        deps.rename(tmp / "requirements.txt")
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"wheelhouse {final.name} ready")
    prune_scoring_wheelhouses(final.parent, keep=final)
    return Wheelhouse(final, key)


SCORING_WHEELHOUSES_KEPT = 3
# A wheelhouse younger than this may be what a build in flight is reading.
WHEELHOUSE_MIN_AGE_S = 3600.0


def prune_scoring_wheelhouses(
    root: Path,
    keep: Path,
    newest: int = SCORING_WHEELHOUSES_KEPT,
    min_age_s: float = WHEELHOUSE_MIN_AGE_S,
) -> list[Path]:
    """Remove scoring wheelhouses beyond the `newest` few (about 50 MB each; every
    change of modelfleet-scoring's sources makes one), once unused for `min_age_s`
    (a folder's mtime is refreshed each time a build uses it).

    Images built from them do not need them; a removed one is rebuilt if needed.
    """
    now = time.time()
    used: list[tuple[float, Path]] = []  # (last used, folder)
    for folder in root.glob("scoring-*"):
        try:
            if folder.is_dir() and folder != keep:
                used.append((folder.stat().st_mtime, folder))
        except OSError:
            continue  # removed meanwhile by another build's pruning
    used.sort(reverse=True)
    removed: list[Path] = []
    for mtime, folder in used[max(newest - 1, 0) :]:
        if now - mtime < min_age_s:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _installed_scoring_wheelhouse(progress: Progress) -> Wheelhouse:
    """Outside a source checkout: the released modelfleet-scoring of the installed version."""
    try:
        version = metadata.version(SCORING_DIST)
    except metadata.PackageNotFoundError as exc:
        raise WheelhouseError(f"{SCORING_DIST} is not installed") from exc
    return requirements_wheelhouse(f"{SCORING_DIST}=={version}\n", progress)


def requirements_key(requirements: str) -> str:
    """The cache key of a requirements text's wheelhouse (known before building it)."""
    return hashlib.sha256(b"reqs-v1\0" + requirements.encode()).hexdigest()[:16]


def requirements_wheelhouse(
    requirements: str, progress: Progress = lambda _line: None
) -> Wheelhouse:
    """Wheels for a pip requirements text (a user's dependencies)."""
    key = requirements_key(requirements)
    final = cache_root() / "wheelhouse" / f"reqs-{key}"
    if (final / "requirements.txt").is_file():
        progress(f"wheelhouse {final.name} is cached")
        return Wheelhouse(final, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        (tmp / "requirements.txt").write_text(requirements)
        progress("pip wheel: the inference config's requirements")
        _pip_wheel(tmp / "requirements.txt", tmp)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Wheelhouse(final, key)


def user_requirements(requirements_file: Path | None, conda_file: Path | None) -> str:
    """The pip requirements of an inference config: its requirements file and the
    `pip:` section of its conda file (conda packages themselves are not installed)."""
    lines: list[str] = []
    if requirements_file is not None:
        try:
            text = requirements_file.read_text()
        except OSError as exc:
            raise WheelhouseError(
                f"cannot read requirements file {requirements_file}: {exc.strerror}"
            ) from exc
        for line in text.splitlines():
            stripped = line.split("#", 1)[0].strip()
            if stripped:
                lines.append(stripped)
    if conda_file is not None:
        lines.extend(_conda_pip_section(conda_file))
    # Azure ML's serving stack is what modelfleet-scoring replaces; installing it
    # would only add hundreds of megabytes that nothing imports.
    lines = [ln for ln in lines if not ln.lower().startswith(SKIPPED_AZUREML)]
    return "".join(f"{line}\n" for line in lines)


def _conda_pip_section(conda_file: Path) -> list[str]:
    import yaml

    try:
        doc = yaml.safe_load(conda_file.read_text())
    except OSError as exc:
        raise WheelhouseError(f"cannot read conda file {conda_file}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise WheelhouseError(f"conda file {conda_file} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise WheelhouseError(f"conda file {conda_file}: expected a mapping with 'dependencies'")
    pip: list[str] = []
    for dep in doc.get("dependencies") or []:
        if isinstance(dep, dict) and isinstance(dep.get("pip"), list):
            pip.extend(str(item) for item in dep["pip"])
    return pip
