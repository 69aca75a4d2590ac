"""Content-addressed blob storage for model artifacts (contract section 3).

Blobs live at `blobs/sha256/<2 hex>/<64 hex>`. A blob is written to a temp
file in the same folder, fsynced and renamed into place, so a killed writer
leaves at most a stray temp file, never a truncated blob under a digest.
Folders are stored as an uncompressed, deterministic tar.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from modelfleet.agent.safetar import UnsafeMemberError, safe_extractall
from modelfleet.deployer.errors import ArtifactError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

ArtifactFormat = Literal["file", "tar"]
_CHUNK = 1 << 20
_STALE_TEMP_S = 24 * 3600  # an older temp blob belongs to a killed register


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size: int
    format: ArtifactFormat
    filename: str  # the model file's name, or the folder's name for a tar


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if not (info.isfile() or info.isdir()):
        return None  # symlinks and devices would make the tar depend on the host
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
    return info


def write_deterministic_tar(folder: Path, out: BinaryIO) -> None:
    """Pack `folder`'s contents (relative paths, sorted, mtime 0, uid/gid 0)."""
    entries = sorted(p for p in folder.rglob("*") if p.is_file() or p.is_dir())
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            if entry.is_symlink():
                continue
            arcname = entry.relative_to(folder).as_posix()
            tar.add(entry, arcname=arcname, recursive=False, filter=_tar_filter)


class _HashingWriter:
    """Hashes what it writes, so a blob is read once, not written and read back."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:  # tarfile asks for the position when it opens a stream
        return self.size


class BlobStore:
    """Blobs addressed by sha256 under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.unpacked = root / "unpacked"

    def path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, source: Path) -> StoredBlob:
        """Store a model file or folder; returns its digest. Idempotent."""
        if not source.exists():
            raise ArtifactError(
                f"model path {source} does not exist", hint="check the --path/-p argument"
            )
        if source.is_dir():
            entries = list(source.rglob("*"))
            link = next((p for p in entries if p.is_symlink()), None)
            if link is not None:
                # The tar holds real files only; a skipped link would be a model file lost.
                raise ArtifactError(
                    f"model folder {source} contains a symlink ({link.relative_to(source)}); "
                    "only real files are stored",
                    hint=f"copy the folder with links resolved (cp -rL {source} COPY) "
                    "and register the copy",
                )
            if not any(p.is_file() for p in entries):
                raise ArtifactError(f"model folder {source} contains no files")
            fmt: ArtifactFormat = "tar"
        elif source.is_file():
            fmt = "file"
        else:
            raise ArtifactError(f"model path {source} is neither a file nor a folder")
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        fd, tmp_name = tempfile.mkstemp(prefix=".incoming-", dir=self.blobs)
        tmp = Path(tmp_name)
        try:
            try:
                with os.fdopen(fd, "wb") as raw:
                    out = _HashingWriter(raw)
                    if fmt == "tar":
                        write_deterministic_tar(source, out)  # type: ignore[arg-type]
                    else:
                        try:
                            with source.open("rb") as src:
                                shutil.copyfileobj(src, out, _CHUNK)
                        except OSError as exc:
                            if exc.errno in _DISK_FULL:
                                raise
                            raise ArtifactError(f"cannot read model file {source}: {exc}") from exc
                    raw.flush()
                    os.fsync(raw.fileno())
            except OSError as exc:
                if exc.errno not in _DISK_FULL:
                    raise
                raise ArtifactError(
                    f"no space left to store {source.name} under {self.blobs} "
                    f"({exc.strerror}); nothing was registered",
                    hint="free some disk space, or point MODELFLEET_HOME at a larger disk",
                ) from exc
            digest, size = out.digest, out.size
            sha = digest.hexdigest()
            final = self.path(sha)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)  # same bytes either way, so a concurrent writer is harmless
            _fsync_dir(final.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return StoredBlob(sha256=sha, size=size, format=fmt, filename=source.name)

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - _STALE_TEMP_S
        for tmp in self.blobs.glob(".incoming-*"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()

    def verify(self, sha256: str) -> None:
        path = self.path(sha256)
        if not path.is_file():
            raise ArtifactError(f"blob {sha256[:12]} is missing from {self.blobs}")
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise ArtifactError(
                f"blob {sha256[:12]} at {path} is corrupt (its bytes no longer match the digest)",
                hint="register the original model file again: identical bytes repair the blob",
            )

    def materialise(self, sha256: str, fmt: ArtifactFormat, filename: str) -> Path:
        """A read-only folder holding the artifact as users registered it.

        For a file: `unpacked/<sha>/<filename>` (the returned path is the file);
        for a tar: the unpacked folder. Shared by every service using it.
        """
        # A file is keyed by its name too: the same bytes registered as a.onnx
        # and b.onnx must each sit alone in their folder (the server's model dir).
        folder = self.unpacked / (f"{sha256}-{filename}" if fmt == "file" else sha256)
        result = folder / filename if fmt == "file" else folder
        if folder.is_dir():
            return result
        # Once per artifact (the folder is reused): never deploy bytes that changed on disk.
        self.verify(sha256)
        blob = self.path(sha256)
        self.unpacked.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=self.unpacked))
        try:
            if fmt == "file":
                shutil.copyfile(blob, tmp / filename)
            else:
                with tarfile.open(blob, mode="r:") as tar:
                    try:
                        safe_extractall(tar, tmp)
                    except UnsafeMemberError as exc:
                        raise ArtifactError(f"blob {sha256[:12]}: {exc}; it was not unpacked") from None
            try:
                os.rename(tmp, folder)
            except OSError:
                if not folder.is_dir():  # lost a race with an identical writer otherwise
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return result

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
        if self.unpacked.is_dir():
            for folder in self.unpacked.glob(f"{sha256}*"):
                shutil.rmtree(folder, ignore_errors=True)

    def export(self, sha256: str, fmt: ArtifactFormat, filename: str, dest: Path) -> Path:
        """Copy the artifact to `dest` (a folder): the file, or the unpacked folder.

        Refuses to write over anything already at the target, so a download
        never loses a user's file.
        """
        blob = self.path(sha256)
        if not blob.is_file():
            raise ArtifactError(f"blob {sha256[:12]} is missing from {self.blobs}")
        target = dest / filename
        if target.exists() or target.is_symlink():
            raise ArtifactError(
                f"{target} already exists; nothing was written",
                hint="pass --to an empty or new folder, or move the existing file away",
            )
        try:
            dest.mkdir(parents=True, exist_ok=True)
            if fmt == "file":
                shutil.copyfile(blob, target)
                return target
            target.mkdir()
            with tarfile.open(blob, mode="r:") as tar:
                safe_extractall(tar, target)
        except UnsafeMemberError as exc:
            raise ArtifactError(f"blob {sha256[:12]}: {exc}; nothing more was written") from None
        except OSError as exc:
            raise ArtifactError(
                f"cannot write the model to {dest}: {exc.strerror or exc}",
                hint="--to must be a folder you can write to",
            ) from exc
        return target
