"""The on-device model store: resumable download, verification, atomic install, rollback copy.

Layout under the store root:

    partial/<sha256>.part    bytes downloaded so far (kept across restarts: Range resume)
    versions/<sha256>/       an installed version: the model file, or the unpacked folder
    versions/.tmp-*          an install in progress (removed at start-up)
    manifests/<sha256>.json  an installed version's ref and the sha256 of each of its files,
                             written before the version's rename: the bytes can be checked
                             again at start-up, and a lost state.json rebuilt

Downloads use the standard library's urllib: one streaming GET with a Range
header is all that is needed, and importing httpx or requests would cost a
device 7-12 MiB of resident memory for the agent's lifetime (urllib: ~3.6).

A version exists under `versions/` only after its bytes matched the declared
size and sha256 (and, with trusted keys configured, its signature verified),
and after an fsync'd rename: a power cut leaves either nothing or all of it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import logging
import os
import shutil
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .durable import fsync_dir, write_atomic
from .errors import ArtifactError, ConfigError, Superseded
from .modelref import ModelRefError, ModelVersionRef
from .safetar import UnsafeMemberError, safe_extractall

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from .download import LinkCutter

log = logging.getLogger("modelfleet.agent.store")

_CHUNK = 256 * 1024


@dataclass
class DownloadStats:
    """What the last download did; `resumed_from` > 0 means earlier bytes were kept."""

    sha256: str = ""
    resumed_from: int = 0
    received: int = 0
    seconds: float = 0.0


@dataclass
class TrustedKeys:
    """Ed25519 public keys a signed version must verify against, by key id.

    A key id is the first 16 hex digits of the sha256 of the raw public key, as
    `modelfleet model register --sign-key` writes it into `ModelVersionRef.key_id`.
    """

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    @classmethod
    def load(cls, paths: list[Path]) -> TrustedKeys:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            PublicFormat,
            load_pem_public_key,
        )

        keys: dict[str, Ed25519PublicKey] = {}
        for path in paths:
            try:
                key = load_pem_public_key(Path(path).read_bytes())
            except (OSError, ValueError) as exc:
                raise ConfigError("store.trusted_keys", f"cannot read public key {path}: {exc}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError("store.trusted_keys", f"{path} is not an Ed25519 public key")
            raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
            keys[hashlib.sha256(raw).hexdigest()[:16]] = key
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def check(self, ref: ModelVersionRef) -> None:
        """Raise ArtifactError(stage="verify") unless `ref.signature` verifies over its digest."""
        from cryptography.exceptions import InvalidSignature

        if not ref.signature:
            raise ArtifactError("verify", f"{ref.key} is unsigned and this device only accepts signed versions")
        try:
            signature = base64.b64decode(ref.signature, validate=True)
        except ValueError:
            raise ArtifactError("verify", f"{ref.key}: signature is not valid base64") from None
        digest = bytes.fromhex(ref.sha256)
        if ref.key_id is not None and ref.key_id in self.keys:
            candidates = [self.keys[ref.key_id]]
        else:
            candidates = list(self.keys.values())
        for key in candidates:
            try:
                key.verify(signature, digest)
                return
            except InvalidSignature:
                continue
        raise ArtifactError(
            "verify", f"{ref.key}: signature (key id {ref.key_id or 'none'}) does not verify with any trusted key"
        )


class ModelStore:
    """Downloads, verifies and installs model versions under `root`."""

    def __init__(
        self,
        root: Path,
        *,
        reserve_bytes: int = 0,
        trusted_keys: TrustedKeys | None = None,
        token: str | None = None,
        rate_limit_bps: int = 0,
        timeout_s: float = 30.0,
        allow_file_urls: bool = False,
    ) -> None:
        self.root = Path(root)
        self.allow_file_urls = allow_file_urls
        self.reserve_bytes = reserve_bytes
        self.trusted_keys = trusted_keys or TrustedKeys()
        self.token = token
        self.rate_limit_bps = rate_limit_bps
        self.timeout_s = timeout_s
        self.partial_dir = self.root / "partial"
        self.versions_dir = self.root / "versions"
        self.manifests_dir = self.root / "manifests"
        for folder in (self.partial_dir, self.versions_dir, self.manifests_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.last_download = DownloadStats()
        # what a crash or power cut mid-install or mid-write leaves behind
        for leftover in self.versions_dir.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.manifests_dir.glob("*.tmp"):
            leftover.unlink(missing_ok=True)

    # --- queries ------------------------------------------------------------------
    def version_dir(self, ref: ModelVersionRef) -> Path:
        return self.versions_dir / ref.sha256

    def is_installed(self, ref: ModelVersionRef) -> bool:
        return self.version_dir(ref).is_dir()

    def model_dir(self, ref: ModelVersionRef) -> Path:
        """What the scoring host loads: the folder holding the file, or the unpacked archive."""
        return self.version_dir(ref)

    def installed(self) -> list[str]:
        return sorted(p.name for p in self.versions_dir.iterdir() if not p.name.startswith("."))

    def partial_size(self, ref: ModelVersionRef) -> int:
        part = self._part(ref)
        return part.stat().st_size if part.exists() else 0

    def _manifest(self, sha256: str) -> Path:
        return self.manifests_dir / f"{sha256}.json"

    def _read_manifest(self, sha256: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._manifest(sha256).read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def damage(self, ref: ModelVersionRef) -> str | None:
        """Why the installed bytes of `ref` cannot be trusted (missing, changed on disk), or None.

        Reads every file of the version once (a power cut or a failing disk can damage
        what was verified at install). A folder installed before manifests existed is
        taken as it is: there is nothing to check it against.
        """
        folder = self.version_dir(ref)
        if not folder.is_dir():
            return f"{ref.key} is not on disk ({folder} is missing)"
        expected: dict[str, str]
        if ref.format == "file":
            expected = {ref.filename: ref.sha256}  # the file is the artifact itself
        else:
            manifest = self._read_manifest(ref.sha256)
            files = manifest.get("files") if manifest else None
            if not isinstance(files, dict):
                log.info("event=version_unverifiable model=%s reason=no_manifest", ref.key)
                return None
            expected = {str(k): str(v) for k, v in files.items()}
        for rel, sha in sorted(expected.items()):
            path = folder / rel
            try:
                actual = _sha256_file(path)
            except OSError as exc:
                return f"{ref.key}: {rel} cannot be read ({exc.strerror or exc})"
            if actual != sha:
                return f"{ref.key}: {rel} changed on disk (sha256 {actual[:12]}…, expected {sha[:12]}…)"
        return None

    def remove(self, ref: ModelVersionRef) -> None:
        """Delete an installed version whose bytes are damaged, so a later fetch downloads it again."""
        shutil.rmtree(self.version_dir(ref), ignore_errors=True)
        self._manifest(ref.sha256).unlink(missing_ok=True)
        fsync_dir(self.versions_dir)
        log.warning("event=version_removed model=%s sha256=%s", ref.key, ref.sha256[:12])

    def recoverable(self) -> list[ModelVersionRef]:
        """Installed versions whose manifest names their ref, most recently installed first
        (what a device can serve when its state.json was lost)."""
        found: list[tuple[float, ModelVersionRef]] = []
        for path in self.manifests_dir.glob("*.json"):
            manifest = self._read_manifest(path.stem)
            if manifest is None or not self.version_dir_of(path.stem).is_dir():
                continue
            try:
                ref = ModelVersionRef.from_dict(manifest.get("ref"))
                installed_at = float(manifest.get("installed_at", 0.0))
            except (ModelRefError, TypeError, ValueError):
                continue
            if ref.sha256 == path.stem:
                found.append((installed_at, ref))
        return [ref for _, ref in sorted(found, key=lambda item: item[0], reverse=True)]

    def version_dir_of(self, sha256: str) -> Path:
        return self.versions_dir / sha256

    # --- the pipeline -------------------------------------------------------------
    def fetch(self, ref: ModelVersionRef, cancel: threading.Event | None = None) -> Path:
        """Make `ref` installed (download, verify, install); its model folder. Idempotent: an
        installed version is checked against its manifest (`damage`) and downloaded again if damaged."""
        if not ref.url.startswith(("http://", "https://")) and not (
            self.allow_file_urls and ref.url.startswith("file://")
        ):
            # a desired state must not make the device read (and serve) whatever local file it names
            scheme = ref.url.partition(":")[0]
            raise ArtifactError(
                "download",
                f"{ref.key}: {scheme}:// artifact URLs are refused ({ref.url}); this device downloads over "
                "http(s) only (set store.allow_file_urls = true to allow file:// URLs)",
            )
        if self.trusted_keys:
            # the signature covers the digest, so a bad one is refused before any byte is fetched
            self.trusted_keys.check(ref)
        if self.is_installed(ref):
            damage = self.damage(ref)
            if damage is None:
                return self.model_dir(ref)
            # changed since it was installed (a failing disk, a power cut): never served, fetched anew
            log.error("event=installed_version_damaged model=%s reason=%r", ref.key, damage)
            self.remove(ref)
        part = self._download(ref, cancel)
        try:
            self._verify(ref, part)
        except ArtifactError:
            if not self.last_download.resumed_from:
                raise
            # the bytes kept from before may be what is wrong (a power cut mid-write):
            # blame the artifact only after one clean download from zero
            log.warning("event=resumed_download_corrupt model=%s retry=from_zero", ref.key)
            part = self._download(ref, cancel)
            self._verify(ref, part)
        return self._install(ref, part)

    def prune(self, keep: set[str]) -> None:
        """Delete installed versions and partial downloads whose sha256 is not in `keep`."""
        for path in self.versions_dir.iterdir():
            if not path.name.startswith(".") and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
                log.info("event=version_pruned sha256=%s", path.name)
        for part in self.partial_dir.glob("*.part"):
            if part.stem not in keep:
                part.unlink(missing_ok=True)
        for manifest in self.manifests_dir.glob("*.json"):
            if manifest.stem not in keep:
                manifest.unlink(missing_ok=True)

    # --- download -----------------------------------------------------------------
    def _part(self, ref: ModelVersionRef) -> Path:
        return self.partial_dir / f"{ref.sha256}.part"

    def _check_disk(self, ref: ModelVersionRef, have: int) -> None:
        # an archive is unpacked beside itself, so it needs its size twice
        need = (ref.size - have) + (ref.size if ref.format == "tar" else 0)
        free = shutil.disk_usage(self.root).free
        if free - need < self.reserve_bytes:
            raise ArtifactError(
                "download",
                f"not enough disk space for {ref.key}: needs {need} bytes and a reserve of "
                f"{self.reserve_bytes} bytes must stay free, but only {free} bytes are free",
            )

    def _download(self, ref: ModelVersionRef, cancel: threading.Event | None) -> Path:
        from .download import LinkCutter

        if cancel is None:
            return self._download_cut(ref, None)
        # a stalled server must not hold up a cancel (SIGTERM, a newer $version) for timeout_s
        with LinkCutter(cancel) as cutter:
            return self._download_cut(ref, cutter)

    def _download_cut(self, ref: ModelVersionRef, cutter: LinkCutter | None) -> Path:
        import urllib.error
        import urllib.request

        from .download import open_url

        cancel = cutter.cancel if cutter is not None else None
        part = self._part(ref)
        have = part.stat().st_size if part.exists() else 0
        if have > ref.size:
            part.unlink()
            have = 0
        self._check_disk(ref, have)
        stats = DownloadStats(sha256=ref.sha256, resumed_from=have)
        started = time.monotonic()
        if have == ref.size:
            self.last_download = stats
            return part
        headers = {"User-Agent": "modelfleet-agent"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if have:
            headers["Range"] = f"bytes={have}-"
        request = urllib.request.Request(ref.url, headers=headers)
        try:
            response = open_url(request, self.timeout_s, cutter)
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response's connection: closed now, not at garbage collection
            if exc.code == 416 and have:
                # the server has fewer bytes than we kept: start again from zero
                part.unlink(missing_ok=True)
                raise ArtifactError("download", f"{ref.url}: range not satisfiable, restarting", transient=True) from None
            raise ArtifactError(
                "download", f"{ref.url}: HTTP {exc.code} {exc.reason}", transient=exc.code >= 500 or exc.code == 429
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            _check_cancel(ref, cancel)  # the link was cut on purpose
            reason = getattr(exc, "reason", exc)
            raise ArtifactError("download", f"{ref.url}: {reason}", transient=True) from None
        with response:
            if have and response.status == 200:
                have = 0  # the server ignored Range: take the whole body again
                stats.resumed_from = 0
            elif have and response.status == 206:
                content_range = response.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {have}-"):
                    part.unlink(missing_ok=True)
                    raise ArtifactError(
                        "download", f"{ref.url}: unexpected Content-Range {content_range!r}", transient=True
                    )
            stats.received = self._stream(ref, response, part, have, cancel)
        stats.seconds = time.monotonic() - started
        self.last_download = stats
        log.info(
            "event=download_done model=%s sha256=%s resumed_from=%d received=%d seconds=%.3f",
            ref.key, ref.sha256[:12], stats.resumed_from, stats.received, stats.seconds,
        )
        return part

    def _stream(self, ref: ModelVersionRef, response: Any, part: Path, have: int, cancel: threading.Event | None) -> int:
        try:
            out = open(part, "r+b" if have else "wb")  # noqa: SIM115 (closed on every path below)
        except OSError as exc:
            raise _write_failed(ref, part, exc) from None
        try:
            out.seek(have)
            out.truncate()
            received = self._copy(ref, response, out, have, cancel)
            out.flush()
            os.fsync(out.fileno())
            out.close()
        except OSError as exc:  # the read side raises ArtifactError: this is the disk (full, or failing)
            _close_keeping_bytes(out)
            raise _write_failed(ref, part, exc) from None
        except BaseException:
            _close_keeping_bytes(out)
            raise
        if have + received < ref.size:
            raise ArtifactError(
                "download", f"{ref.url}: connection closed at {have + received} of {ref.size} bytes", transient=True
            )
        return received

    def _copy(self, ref: ModelVersionRef, response: Any, out: BinaryIO, have: int,
              cancel: threading.Event | None) -> int:
        received = 0
        started = time.monotonic()
        while True:
            _check_cancel(ref, cancel)
            try:
                # read1: whatever has arrived, so that the bytes of a link that stalls are on disk
                chunk = response.read1(_CHUNK)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                _check_cancel(ref, cancel)  # the link was cut on purpose
                raise ArtifactError("download", f"{ref.url}: connection lost ({exc})", transient=True) from None
            if not chunk:
                _check_cancel(ref, cancel)  # a cut link reads as end-of-file
                return received
            if have + received + len(chunk) > ref.size:
                out.truncate(0)
                raise ArtifactError(
                    "verify", f"{ref.key}: the server sent more than the declared size of {ref.size} bytes"
                )
            out.write(chunk)
            # to the OS at once: what arrived before a stall or a SIGTERM/SIGKILL is there to resume from
            out.flush()
            received += len(chunk)
            if self.rate_limit_bps:
                # a bandwidth cap for metered links: sleep until we are back under it
                ahead = received / self.rate_limit_bps - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)

    # --- verify and install -------------------------------------------------------
    def _verify(self, ref: ModelVersionRef, part: Path) -> None:
        size = part.stat().st_size
        if size != ref.size:
            part.unlink(missing_ok=True)
            raise ArtifactError("verify", f"{ref.key}: size mismatch: expected {ref.size} bytes, got {size}")
        actual = _sha256_file(part)
        if actual != ref.sha256:
            # corrupt bytes must not be resumed from either
            part.unlink(missing_ok=True)
            raise ArtifactError("verify", f"{ref.key}: sha256 mismatch: expected {ref.sha256}, got {actual}")

    def _install(self, ref: ModelVersionRef, part: Path) -> Path:
        final = self.version_dir(ref)
        tmp = self.versions_dir / f".tmp-{ref.sha256[:16]}-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            if ref.format == "tar":
                safe_extract(part, tmp)
                part.unlink()
            else:
                os.replace(part, tmp / ref.filename)
            _fsync_tree(tmp)
            if final.exists():  # installed meanwhile (a restart raced us): keep the existing copy
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                # durable before the folder appears: an installed version always has its manifest
                self._write_manifest(ref, tmp)
                os.replace(tmp, final)
            fsync_dir(self.versions_dir)
        except ArtifactError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ArtifactError("install", f"{ref.key}: {exc}") from None
        log.info("event=version_installed model=%s sha256=%s", ref.key, ref.sha256[:12])
        return final

    def _write_manifest(self, ref: ModelVersionRef, folder: Path) -> None:
        if ref.format == "file":
            files = {ref.filename: ref.sha256}  # verified a moment ago: no second read
        else:
            files = {
                path.relative_to(folder).as_posix(): _sha256_file(path)
                for path in sorted(folder.rglob("*"))
                if path.is_file() and not path.is_symlink()
            }
        manifest = {"ref": ref.to_dict(), "files": files, "installed_at": time.time()}
        write_atomic(self._manifest(ref.sha256), json.dumps(manifest, sort_keys=True).encode())


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _check_cancel(ref: ModelVersionRef, cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Superseded(f"download of {ref.key} stopped (a newer desired state, or shutting down)")


def _write_failed(ref: ModelVersionRef, part: Path, exc: OSError) -> ArtifactError:
    # final, like the disk reserve: the bytes written so far stay, and a newer $version resumes from them
    return ArtifactError("download", f"cannot write the download of {ref.key} to {part}: {exc.strerror or exc}")


def _close_keeping_bytes(out: BinaryIO) -> None:
    """Flush, fsync and close a partial download on a failure path: what reached the disk stays for a
    resume; a second write error here (a full disk again) was already reported and is not worth another."""
    with contextlib.suppress(OSError):
        out.flush()
        os.fsync(out.fileno())
    with contextlib.suppress(OSError):
        out.close()


def safe_extract(archive: Path, target: Path) -> None:
    """Unpack a tar into `target`, refusing any member that could land outside it.

    `safetar` applies Python's "data" filter (or the same rules where this Python
    predates it): `..` escapes and absolute names, links pointing outside, device
    and fifo members are refused, set-uid bits dropped. The first refused member
    aborts the whole install before anything is written.
    """
    try:
        with tarfile.open(archive, "r:") as tar:
            safe_extractall(tar, target)
    except UnsafeMemberError as exc:
        raise ArtifactError("install", str(exc)) from None
    except tarfile.TarError as exc:
        raise ArtifactError("install", f"not a valid tar archive: {exc}") from None


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))
