"""What every target that runs the scoring server writes and checks first:
the keys and admin key files in the service workdir, the entry script, a port.

Both the local and the docker target start `modelfleet.scoring serve` from a
service workdir the same way; these are the pieces they share.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import stat
from pathlib import Path

from modelfleet.deployer.errors import DeploymentError
from modelfleet.deployer.targets.base import ServiceSpec

KEYS_FILE = Path("secrets") / "keys.json"  # contract-1 keys JSON, relative to the workdir
ADMIN_KEY_FILE = Path("secrets") / "admin.key"


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """Temp file + fsync + rename: the server never reads a half-written file.

    Replacing a file keeps its owner and mode: a target may have handed it to
    the server's own user (the docker target does), and a key rotation must
    not take it back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        old: os.stat_result | None = path.stat()
    except FileNotFoundError:
        old = None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as fh:
            if old is not None:
                os.fchmod(fd, stat.S_IMODE(old.st_mode))
                if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                    with contextlib.suppress(PermissionError):  # only root may give a file away
                        os.fchown(fd, old.st_uid, old.st_gid)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # The temp file may hold keys: never leave it beside the real one.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_keys(spec: ServiceSpec, workdir: Path) -> Path | None:
    """The service's keys file (configured keys, else random ones); None when auth is off."""
    if not spec.deployment.auth_enabled:
        return None
    path = workdir / KEYS_FILE
    keys = {
        "primary": spec.deployment.primary_key or secrets.token_urlsafe(32),
        "secondary": spec.deployment.secondary_key or secrets.token_urlsafe(32),
    }
    write_atomic(path, json.dumps(keys))
    return path


def write_admin_key(workdir: Path) -> Path:
    """A fresh admin key for the server's model repository endpoint."""
    path = workdir / ADMIN_KEY_FILE
    write_atomic(path, secrets.token_urlsafe(32) + "\n")
    return path


def check_entry_script(spec: ServiceSpec, error: type[DeploymentError]) -> None:
    """Fail before starting or building anything when the entry script does not compile."""
    inf = spec.inference
    if inf.entry_script is None:
        return
    script = (inf.source_directory or Path.cwd()) / inf.entry_script
    if not script.is_file():
        where = f" in source directory {inf.source_directory}" if inf.source_directory else ""
        raise error(f"entry script {inf.entry_script} not found{where}")
    try:
        compile(script.read_bytes(), str(script), "exec")
    except SyntaxError as exc:
        raise error(
            f"{inf.entry_script} line {exc.lineno}: {exc.msg}: {(exc.text or '').strip()}",
            hint="fix the entry script and deploy again",
        ) from exc


def free_port() -> int:
    """A port on 127.0.0.1 that is free now (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
