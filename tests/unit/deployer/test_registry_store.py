"""The registry library: versions, deduplication, folders, concurrency, crash safety."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from modelfleet.deployer.errors import (
    ArtifactError,
    ModelInUseError,
    ModelNotFoundError,
    RegistryError,
)
from modelfleet.deployer.registry import Registry
from modelfleet.deployer.targets.base import ServiceRecord


def test_versions_count_up_per_name_and_identical_bytes_are_reported(
    home: Path, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    reg = Registry()
    first = reg.register("digits", digits_onnx, tags={"stage": "dev"})
    again = reg.register("digits", digits_onnx)
    second = reg.register("digits", digits_onnx_v2)
    other = reg.register("other", digits_onnx)
    assert (first.created, first.model.version) == (True, 1)
    assert (again.created, again.model.key) == (False, "digits:1")
    assert second.model.version == 2 and other.model.version == 1
    assert [m.key for m in reg.list_models(name="digits")] == ["digits:1", "digits:2"]
    assert [m.key for m in reg.list_models(tags={"stage": "dev"})] == ["digits:1"]
    assert reg.get_model("digits").version == 2  # latest
    assert first.model.framework == "onnx" and first.model.format == "file"
    # one blob for the shared bytes, stored under its digest
    blob = reg.blobs.path(first.model.sha256)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == first.model.sha256
    assert len(list((home / "blobs" / "sha256").rglob("*"))) == 4  # 2 dirs + 2 blobs


def test_folder_is_stored_as_a_deterministic_tar(home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("b")
    (folder / "sub" / "model.tflite").write_bytes(b"\x00" * 10)
    reg = Registry()
    model = reg.register("bundle", folder).model
    os.utime(folder / "b.txt", (1, 1))  # mtimes must not change the digest
    assert reg.register("bundle", folder).created is False
    assert model.format == "tar" and model.framework == "tflite"
    with tarfile.open(fileobj=io.BytesIO(reg.blobs.path(model.sha256).read_bytes())) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["b.txt", "sub", "sub/model.tflite"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
    unpacked = reg.binding(model).path
    assert (unpacked / "sub" / "model.tflite").read_bytes() == b"\x00" * 10


def test_unknown_model_and_version_errors_name_what_exists(home: Path, digits_onnx: Path) -> None:
    reg = Registry()
    reg.register("digits", digits_onnx)
    with pytest.raises(ModelNotFoundError, match="model 'nope' is not registered"):
        reg.resolve("nope:1")
    with pytest.raises(ModelNotFoundError, match="has no version 7") as info:
        reg.resolve("digits:7")
    assert info.value.hint == "registered versions: 1"
    with pytest.raises(RegistryError, match="invalid version 'x'"):
        reg.resolve("digits:x")


def test_bad_register_input_is_refused_and_stores_nothing(home: Path, tmp_path: Path) -> None:
    reg = Registry()
    with pytest.raises(ArtifactError, match="does not exist"):
        reg.register("digits", tmp_path / "missing.onnx")
    with pytest.raises(RegistryError, match="invalid model name"):
        reg.register("bad name", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArtifactError, match="contains no files"):
        reg.register("digits", empty)
    with pytest.raises(RegistryError, match="unknown framework 'pytorch'"):
        reg.register("digits", tmp_path, framework="pytorch")
    assert reg.list_models() == []


def test_delete_is_refused_while_a_service_uses_the_version(
    home: Path, digits_onnx: Path
) -> None:
    reg = Registry()
    model = reg.register("digits", digits_onnx).model
    reg.reserve_service("svc", "local", {})
    reg.save_service(ServiceRecord("svc", "local", "healthy", models=["digits:1"]))
    with pytest.raises(ModelInUseError, match=r"digits:1 is used by service\(s\) svc"):
        reg.delete_model("digits", 1)
    assert reg.blobs.exists(model.sha256)
    reg.delete_model("digits", 1, force=True)
    assert reg.list_models() == [] and not reg.blobs.exists(model.sha256)


def test_a_deploy_or_update_in_progress_counts_as_using_its_models(
    home: Path, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    reg = Registry()
    reg.register("digits", digits_onnx)
    reg.register("digits", digits_onnx_v2)
    reg.reserve_service("fresh", "local", {}, models=["digits:1"])  # deploying, nothing saved yet
    with pytest.raises(ModelInUseError, match=r"digits:1 is used by service\(s\) fresh"):
        reg.delete_model("digits", 1)
    reg.save_service(ServiceRecord("fresh", "local", "healthy", models=["digits:1"]))
    reg.begin_operation("fresh", "update", models=["digits:2"])  # updating to digits:2
    with pytest.raises(ModelInUseError, match=r"digits:2 is used by service\(s\) fresh"):
        reg.delete_model("digits", 2)
    assert reg.services_using(reg.get_model("digits", 2)) == ["fresh"]
    reg.end_operation("fresh", "healthy")  # the update failed: digits:2 is free again
    assert reg.delete_model("digits", 2).key == "digits:2"
    with pytest.raises(ModelNotFoundError, match="model 'digits' has no version 2"):
        reg.delete_model("digits", 2)


def test_a_deploy_of_a_model_deleted_meanwhile_is_refused_when_it_claims_the_name(
    home: Path, digits_onnx: Path
) -> None:
    reg = Registry()
    reg.register("digits", digits_onnx)
    reg.delete_model("digits", 1)  # after the deploy resolved digits:1, before it claimed the name
    with pytest.raises(ModelNotFoundError, match=r"model digits:1 is not registered \(was it just"):
        reg.reserve_service("late", "local", {}, models=["digits:1"])
    assert reg.list_services() == []


def test_delete_keeps_a_blob_another_name_still_uses(home: Path, digits_onnx: Path) -> None:
    reg = Registry()
    a = reg.register("a", digits_onnx).model
    reg.register("b", digits_onnx)
    reg.delete_model("a", 1)
    assert reg.blobs.exists(a.sha256)
    reg.blobs.verify(a.sha256)


_REGISTER = """
import sys
from pathlib import Path
from modelfleet.deployer.registry import Registry
print(Registry().register(sys.argv[1], Path(sys.argv[2])).model.version)
"""


def test_concurrent_registers_get_distinct_versions(home: Path, tmp_path: Path) -> None:
    files = []
    for i in range(6):
        f = tmp_path / f"m{i}.onnx"
        f.write_bytes(os.urandom(64 * 1024))
        files.append(f)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _REGISTER, "digits", str(f)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for f in files
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outputs
    versions = sorted(int(out.strip()) for out, _ in outputs)
    assert versions == [1, 2, 3, 4, 5, 6]
    reg = Registry()
    assert len(reg.list_models(name="digits")) == 6
    for m in reg.list_models():
        reg.blobs.verify(m.sha256)


def test_a_killed_register_leaves_no_version(home: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.onnx"
    with big.open("wb") as fh:
        fh.truncate(384 * 1024 * 1024)  # sparse: quick to create, slow enough to copy
    Registry()  # create the database first so the child only copies
    proc = subprocess.Popen([sys.executable, "-c", _REGISTER, "big", str(big)])
    blobs = home / "blobs" / "sha256"
    deadline = time.monotonic() + 60
    caught = False
    while time.monotonic() < deadline and proc.poll() is None:
        if blobs.is_dir() and any(p.name.startswith(".incoming-") for p in blobs.iterdir()):
            proc.send_signal(signal.SIGKILL)
            caught = True
            break
        time.sleep(0.002)
    proc.wait(30)
    assert caught and proc.returncode == -signal.SIGKILL, "register finished before the kill"
    reg = Registry()
    assert reg.list_models() == []
    # no blob is published under a digest: only the temp file is left behind
    assert [p for p in blobs.rglob("*") if p.is_file() and not p.name.startswith(".")] == []
    small = tmp_path / "small.onnx"
    small.write_bytes(b"model")
    assert reg.register("big", small).model.version == 1


def test_temp_files_of_long_dead_registers_are_swept(home: Path, digits_onnx: Path) -> None:
    reg = Registry()
    reg.register("digits", digits_onnx)
    stale = home / "blobs" / "sha256" / ".incoming-dead"
    fresh = home / "blobs" / "sha256" / ".incoming-live"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))
    reg.register("other", digits_onnx)
    assert not stale.exists() and fresh.exists()  # a live register's temp file is left alone


def test_same_bytes_under_two_file_names_each_get_their_own_model_folder(
    home: Path, digits_onnx: Path, tmp_path: Path
) -> None:
    other = tmp_path / "renamed.onnx"
    other.write_bytes(digits_onnx.read_bytes())
    reg = Registry()
    a = reg.binding(reg.register("a", digits_onnx).model)
    b = reg.binding(reg.register("b", other).model)
    assert a.sha256 == b.sha256
    assert [p.name for p in a.path.parent.iterdir()] == ["model.onnx"]
    assert [p.name for p in b.path.parent.iterdir()] == ["renamed.onnx"]
    reg.delete_model("a", 1)
    reg.delete_model("b", 1)
    assert list((home / "unpacked").iterdir()) == []


def test_a_tampered_blob_is_never_unpacked_for_a_service_and_re_register_repairs_it(
    home: Path, digits_onnx: Path
) -> None:
    reg = Registry()
    model = reg.register("digits", digits_onnx).model
    blob = reg.blobs.path(model.sha256)
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes() + b"tampered")
    with pytest.raises(ArtifactError, match=r"blob [0-9a-f]{12} at .* is corrupt") as info:
        reg.binding(model)
    assert "register the original model file again" in info.value.hint
    assert not (home / "unpacked").exists() or list((home / "unpacked").iterdir()) == []
    assert reg.register("digits", digits_onnx).created is False  # same version, blob rewritten
    assert reg.binding(model).path.read_bytes() == digits_onnx.read_bytes()


def test_a_folder_with_a_symlink_is_refused_instead_of_losing_the_linked_file(
    home: Path, tmp_path: Path
) -> None:
    real = tmp_path / "weights.onnx"
    real.write_bytes(b"weights")
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "labels.txt").write_text("a\nb\n")
    (folder / "model.onnx").symlink_to(real)
    reg = Registry()
    with pytest.raises(ArtifactError, match=r"contains a symlink \(model\.onnx\)") as info:
        reg.register("bundle", folder)
    assert "cp -rL" in info.value.hint
    assert reg.list_models() == []
