"""The model store: verified, resumable, atomic installs; safe archives; signatures; disk reserve."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import os
import re
import socket
import tarfile
import threading
import time
from pathlib import Path

import pytest
from agent_blobserver import BlobServer  # type: ignore[import-not-found]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelfleet.agent.errors import ArtifactError, ConfigError, Superseded
from modelfleet.agent.modelref import ModelVersionRef
from modelfleet.agent.store import ModelStore, TrustedKeys

PAYLOAD = os.urandom(300_000)


def store_at(root: Path, server: BlobServer, **kw: object) -> ModelStore:
    return ModelStore(root, token=server.token, **kw)  # type: ignore[arg-type]


def test_fetch_installs_verified_file_once(tmp_path: Path, blob_server: BlobServer) -> None:
    ref = blob_server.add(PAYLOAD, filename="model.onnx")
    store = store_at(tmp_path, blob_server)
    folder = store.fetch(ref)
    assert (folder / "model.onnx").read_bytes() == PAYLOAD
    assert store.installed() == [ref.sha256]
    served = blob_server.served
    assert store.fetch(ref) == folder  # already installed: no second download
    assert blob_server.served == served


def test_dropped_link_resumes_with_range_and_keeps_finished_bytes(tmp_path: Path, blob_server: BlobServer) -> None:
    ref = blob_server.add(PAYLOAD)
    blob_server.cut_after = 100_000
    store = store_at(tmp_path, blob_server)
    with pytest.raises(ArtifactError, match="connection closed at 100000 of 300000 bytes") as info:
        store.fetch(ref)
    assert info.value.transient and info.value.stage == "download"
    assert store.partial_size(ref) == 100_000
    assert not store.is_installed(ref)

    store = store_at(tmp_path, blob_server)  # a restarted agent
    store.fetch(ref)
    assert blob_server.ranges[-1] == "bytes=100000-"
    assert store.last_download.resumed_from == 100_000 and store.last_download.received == 200_000
    assert blob_server.served == len(PAYLOAD)  # no byte fetched twice
    assert store.partial_size(ref) == 0


def test_sha_mismatch_is_refused_and_leaves_nothing(tmp_path: Path, blob_server: BlobServer) -> None:
    ref = blob_server.add(PAYLOAD)
    other = blob_server.add(b"x" * len(PAYLOAD))
    lying = dataclasses.replace(ref, url=other.url)
    store = store_at(tmp_path, blob_server)
    with pytest.raises(ArtifactError, match="sha256 mismatch: expected") as info:
        store.fetch(lying)
    assert info.value.stage == "verify" and not info.value.transient
    assert store.installed() == [] and store.partial_size(lying) == 0


def test_size_mismatch_is_refused(tmp_path: Path, blob_server: BlobServer) -> None:
    ref = blob_server.add(PAYLOAD)
    store = store_at(tmp_path, blob_server)
    with pytest.raises(ArtifactError, match="more than the declared size of 10 bytes"):
        store.fetch(dataclasses.replace(ref, size=10))
    with pytest.raises(ArtifactError, match="connection closed at 300000 of 400000 bytes"):
        store.fetch(dataclasses.replace(ref, size=400_000))


@pytest.mark.parametrize(
    ("token", "path", "message", "transient"),
    [
        ("wrong", None, "HTTP 401", False),
        ("t0ken", "/v1/artifacts/" + "f" * 64, "HTTP 404", False),
    ],
)
def test_http_errors_are_named(
    tmp_path: Path, blob_server: BlobServer, token: str, path: str | None, message: str, transient: bool
) -> None:
    ref = blob_server.add(PAYLOAD)
    if path:
        ref = dataclasses.replace(ref, url=f"http://127.0.0.1:{blob_server.port}{path}")
    store = ModelStore(tmp_path, token=token)
    with pytest.raises(ArtifactError, match=message) as info:
        store.fetch(ref)
    assert info.value.transient is transient


def test_unreachable_server_is_transient(tmp_path: Path, blob_server: BlobServer) -> None:
    # a port bound but not listening refuses connections, and stays ours (a fixed port may be taken)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1/artifacts/x"
        ref = dataclasses.replace(blob_server.add(PAYLOAD), url=url)
        with pytest.raises(ArtifactError, match="Connection refused") as info:
            ModelStore(tmp_path).fetch(ref)
    assert info.value.transient


def test_disk_reserve_refuses_with_a_clear_reason(tmp_path: Path, blob_server: BlobServer) -> None:
    ref = blob_server.add(PAYLOAD)
    store = store_at(tmp_path, blob_server, reserve_bytes=1 << 62)
    with pytest.raises(ArtifactError, match=r"not enough disk space for m:1: needs 300000 bytes and a reserve"):
        store.fetch(ref)
    assert blob_server.served == 0


def test_cancel_abandons_the_download_but_keeps_bytes_for_later(tmp_path: Path, blob_server: BlobServer) -> None:
    ref = blob_server.add(PAYLOAD)
    cancel = threading.Event()
    cancel.set()
    store = store_at(tmp_path, blob_server)
    with pytest.raises(Superseded):
        store.fetch(ref, cancel)
    assert not store.is_installed(ref)


@pytest.mark.parametrize("server", ["blob_server", "https_blob_server"])
def test_cancel_stops_a_stalled_download_at_once_and_keeps_its_bytes(
    tmp_path: Path, request: pytest.FixtureRequest, server: str
) -> None:
    # over TLS too: the cutter shuts down the TLS connection's socket under the blocked read
    blob_server: BlobServer = request.getfixturevalue(server)
    ref = blob_server.add(PAYLOAD)
    blob_server.stall_after = len(PAYLOAD) // 2
    store = store_at(tmp_path, blob_server, timeout_s=30.0)
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def fetch() -> None:
        try:
            store.fetch(ref, cancel)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=fetch)
    worker.start()
    deadline = time.monotonic() + 10
    while store.partial_size(ref) < len(PAYLOAD) // 2:  # read1 writes what arrived before the stall
        assert time.monotonic() < deadline, "the bytes sent before the stall never reached the disk"
        time.sleep(0.01)
    cancel.set()
    started = time.monotonic()
    worker.join(5)
    assert not worker.is_alive(), "fetch still blocked on the stalled socket"
    assert time.monotonic() - started < 1.0  # not the 30 s read timeout
    assert len(outcome) == 1 and isinstance(outcome[0], Superseded), outcome
    assert store.partial_size(ref) == len(PAYLOAD) // 2  # kept for a Range resume

    blob_server.release.set()
    store.fetch(ref, threading.Event())  # the resume through the cutter's connection classes
    assert store.is_installed(ref)
    assert blob_server.ranges[-1] == f"bytes={len(PAYLOAD) // 2}-"


def test_a_stalled_download_times_out_after_timeout_s_and_keeps_its_bytes(
    tmp_path: Path, blob_server: BlobServer
) -> None:
    ref = blob_server.add(PAYLOAD)
    blob_server.stall_after = len(PAYLOAD) // 2
    store = store_at(tmp_path, blob_server, timeout_s=0.5)
    with pytest.raises(ArtifactError, match=r"connection lost \(timed out\)") as info:
        store.fetch(ref, threading.Event())
    assert info.value.transient  # retried with backoff, resuming from what arrived
    assert store.partial_size(ref) == len(PAYLOAD) // 2


def test_file_url_is_refused_unless_the_config_allows_it(tmp_path: Path) -> None:
    blob = tmp_path / "model.onnx"
    blob.write_bytes(PAYLOAD)
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    ref = ModelVersionRef(name="m", version=1, url=blob.as_uri(), sha256=sha, size=len(PAYLOAD))
    with pytest.raises(ArtifactError, match=r"m:1: file:// artifact URLs are refused .*set store\.allow_file_urls = true") as info:
        ModelStore(tmp_path / "store").fetch(ref)
    assert info.value.stage == "download" and not info.value.transient
    store = ModelStore(tmp_path / "store", allow_file_urls=True)
    assert (store.fetch(ref) / "model.onnx").read_bytes() == PAYLOAD


def _tar(members: list[tarfile.TarInfo], data: bytes = b"payload") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            if m.isreg():
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
            else:
                tar.addfile(m)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def test_tar_is_unpacked_into_the_version_folder(tmp_path: Path, blob_server: BlobServer) -> None:
    ref = blob_server.add(
        _tar([_member("model.onnx"), _member("sub/score.py")]), format="tar", entry_script="sub/score.py"
    )
    folder = store_at(tmp_path, blob_server).fetch(ref)
    assert (folder / "model.onnx").read_bytes() == b"payload"
    assert (folder / "sub" / "score.py").exists()


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("../escape.txt"), "unsafe archive member '../escape.txt'"),
        (_member("/etc/evil"), "unsafe archive member '/etc/evil'"),
        (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "unsafe archive member 'link'"),
        (_member("link", tarfile.SYMTYPE, "../../outside"), "unsafe archive member 'link'"),
        (_member("dev", tarfile.CHRTYPE), "unsafe archive member 'dev'"),
    ],
)
def test_unsafe_tar_members_are_refused(
    tmp_path: Path, blob_server: BlobServer, member: tarfile.TarInfo, message: str
) -> None:
    ref = blob_server.add(_tar([_member("model.onnx"), member]), format="tar")
    store = store_at(tmp_path / "store", blob_server)
    with pytest.raises(ArtifactError, match=message) as info:
        store.fetch(ref)
    assert info.value.stage == "install"
    assert store.installed() == []
    assert not (tmp_path / "escape.txt").exists()
    assert [p.name for p in store.versions_dir.iterdir()] == []


def test_not_a_tar_is_refused(tmp_path: Path, blob_server: BlobServer) -> None:
    ref = blob_server.add(b"definitely not a tar" * 100, format="tar")
    with pytest.raises(ArtifactError, match="not a valid tar archive"):
        store_at(tmp_path, blob_server).fetch(ref)


def _keypair(folder: Path) -> tuple[Ed25519PrivateKey, Path]:
    key = Ed25519PrivateKey.generate()
    folder.mkdir(parents=True, exist_ok=True)
    public = folder / "key.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key, public


def test_signatures_are_checked_against_trusted_keys(tmp_path: Path, blob_server: BlobServer) -> None:
    trusted, public = _keypair(tmp_path / "trusted")
    stranger, _ = _keypair(tmp_path / "stranger")
    keys = TrustedKeys.load([public])
    ref = blob_server.add(PAYLOAD)
    digest = bytes.fromhex(ref.sha256)
    store = store_at(tmp_path / "store", blob_server, trusted_keys=keys)

    with pytest.raises(ArtifactError, match="is unsigned and this device only accepts signed versions"):
        store.fetch(ref)
    forged = dataclasses.replace(ref, signature=base64.b64encode(stranger.sign(digest)).decode())
    with pytest.raises(ArtifactError, match="does not verify with any trusted key"):
        store.fetch(forged)
    with pytest.raises(ArtifactError, match="signature is not valid base64"):
        store.fetch(dataclasses.replace(ref, signature="%%%"))
    assert blob_server.served == 0  # refused before downloading

    signed = dataclasses.replace(ref, signature=base64.b64encode(trusted.sign(digest)).decode())
    assert store.fetch(signed).is_dir()


def test_trusted_key_file_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match=r"store\.trusted_keys: cannot read public key"):
        TrustedKeys.load([bad])


def test_prune_keeps_only_what_is_asked(tmp_path: Path, blob_server: BlobServer) -> None:
    store = store_at(tmp_path, blob_server)
    a = blob_server.add(b"a" * 1000)
    b = blob_server.add(b"b" * 1000, version=2)
    store.fetch(a)
    store.fetch(b)
    store.prune({b.sha256})
    assert store.installed() == [b.sha256]


def test_leftover_install_folders_are_removed_at_start(tmp_path: Path) -> None:
    leftover = tmp_path / "versions" / ".tmp-abc"
    leftover.mkdir(parents=True)
    ModelStore(tmp_path)
    assert not leftover.exists()


def test_corrupt_kept_bytes_are_fetched_again_from_zero(tmp_path: Path, blob_server: BlobServer) -> None:
    ref = blob_server.add(PAYLOAD)
    store = store_at(tmp_path, blob_server)
    (store.partial_dir / f"{ref.sha256}.part").write_bytes(b"\0" * 100_000)  # a power cut's leftovers
    folder = store.fetch(ref)
    assert (folder / ref.filename).read_bytes() == PAYLOAD
    assert blob_server.ranges == ["bytes=100000-", None]
    assert store.last_download.resumed_from == 0


def test_disk_filling_up_mid_download_is_named_and_keeps_the_bytes(
    tmp_path: Path, blob_server: BlobServer, small_disk: Path
) -> None:
    ref = blob_server.add(PAYLOAD)
    root = tmp_path / "store"
    root.mkdir()
    # the free-space check passes (the store's own disk is big), then the partial folder's disk fills:
    # what another process writing to a shared disk does to a download
    (root / "partial").symlink_to(small_disk)
    store = store_at(root, blob_server)
    with pytest.raises(ArtifactError, match=r"cannot write the download of m:1 to .*: No space left on device") as info:
        store.fetch(ref)
    assert info.value.stage == "download" and not info.value.transient  # final, like the disk reserve
    kept = store.partial_size(ref)
    assert 0 < kept <= 128 * 1024  # what fitted stays for a resume
    assert not store.is_installed(ref)


def test_installed_versions_are_checked_against_their_manifest_and_rebuilt_newest_first(
    tmp_path: Path, blob_server: BlobServer
) -> None:
    single = blob_server.add(PAYLOAD, name="single")
    folder = blob_server.add(
        _tar([_member("model.onnx"), _member("sub/labels.txt")]), name="folder", format="tar"
    )
    store = store_at(tmp_path, blob_server)
    store.fetch(single)
    store.fetch(folder)
    assert store.damage(single) is None and store.damage(folder) is None
    assert [r.key for r in store.recoverable()] == ["folder:1", "single:1"]
    assert store.recoverable()[0] == folder  # the whole ref, from its manifest

    (store.version_dir(folder) / "sub" / "labels.txt").write_bytes(b"changed")
    assert re.search(r"folder:1: sub/labels\.txt changed on disk \(sha256 \w+…, expected \w+…\)",
                     store.damage(folder) or "")
    (store.version_dir(single) / "model.onnx").unlink()
    assert store.damage(single) == "single:1: model.onnx cannot be read (No such file or directory)"

    store.remove(folder)
    assert not store.is_installed(folder) and [r.key for r in store.recoverable()] == ["single:1"]
    assert "folder:1 is not on disk" in (store.damage(folder) or "")
    store.prune(set())
    assert store.recoverable() == [] and not list((tmp_path / "manifests").iterdir())
