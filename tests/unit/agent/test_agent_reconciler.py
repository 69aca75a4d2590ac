"""The reconciler with a real ModelHost and real ONNX models: apply, retry, supersede, restore."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from agent_blobserver import BlobServer  # type: ignore[import-not-found]

from modelfleet.agent.modelref import ModelVersionRef
from modelfleet.agent.protocol import DesiredState, ReportedState
from modelfleet.agent.reconciler import Backoff, CommandError, Reconciler
from modelfleet.agent.state import StateFile
from modelfleet.agent.store import ModelStore
from modelfleet.scoring import ModelHost


class Harness:
    def __init__(self, root: Path, server: BlobServer, **store_kw: object) -> None:
        self.reports: list[ReportedState] = []
        self.host = ModelHost()
        self.store = ModelStore(root / "models", token=server.token, **store_kw)  # type: ignore[arg-type]

        async def report(state: ReportedState) -> None:
            self.reports.append(state)

        self.reconciler = Reconciler(
            device_id="dev", store=self.store, host=self.host, state_file=StateFile(root / "state.json"),
            report=report, backoff=Backoff(0.05, 0.2),
        )

    async def until(self, check: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not check():
            assert asyncio.get_running_loop().time() < deadline, f"timed out; reports: {self.reports[-3:]}"
            await asyncio.sleep(0.01)

    def reported(self, version: int, status: str) -> bool:
        return bool(self.reports) and self.reports[-1].version == version and self.reports[-1].status == status

    async def apply(self, version: int, ref: ModelVersionRef) -> None:
        """Hand the reconciler a desired state and wait until it reports it applied."""
        self.reconciler.on_desired(DesiredState(version, ref))
        await self.until(lambda: self.reported(version, "applied"))


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


def onnx_ref(server: BlobServer, path: Path, version: int) -> ModelVersionRef:
    return server.add(path.read_bytes(), name="digits", version=version, filename="model.onnx")


def test_apply_persists_and_a_restart_serves_the_same_version(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    v1, v2 = onnx_ref(blob_server, digits_onnx, 1), onnx_ref(blob_server, digits_onnx_v2, 2)

    async def first() -> None:
        h = Harness(tmp_path, blob_server)
        task = asyncio.create_task(h.reconciler.run())
        await h.apply(1, v1)
        await h.apply(2, v2)
        assert h.host.active is not None and h.host.active.version == "2"
        assert [r.stage for r in h.reports if r.status == "applying"] == ["download", "load"] * 2
        task.cancel()

    async def restarted() -> None:
        h = Harness(tmp_path, blob_server)
        await h.reconciler.restore()
        assert h.host.active is not None and h.host.active.version == "2"
        assert h.reconciler.state.previous == v1
        task = asyncio.create_task(h.reconciler.run())
        served = blob_server.served
        await h.apply(2, v2)  # the retained desired state again
        assert blob_server.served == served and not [r for r in h.reports if r.status == "applying"]
        task.cancel()

    run(first)
    run(restarted)


def test_transient_failure_is_retried_with_backoff_and_resumes(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path
) -> None:
    v1 = onnx_ref(blob_server, digits_onnx, 1)
    blob_server.cut_after = 1000

    async def go() -> None:
        h = Harness(tmp_path, blob_server)
        task = asyncio.create_task(h.reconciler.run())
        await h.apply(1, v1)
        retry = [r for r in h.reports if r.attempt == 1 and r.reason]
        assert retry and re.search(r"\(retry in 0\.\ds\)", retry[0].reason or "") and retry[0].status == "applying"
        assert h.store.last_download.resumed_from == 1000
        task.cancel()

    run(go)


def test_newer_desired_state_supersedes_a_download_in_progress(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    slow = blob_server.add(b"\0" * 2_000_000, name="slow", version=1)
    v2 = onnx_ref(blob_server, digits_onnx_v2, 2)

    async def go() -> None:
        h = Harness(tmp_path, blob_server, rate_limit_bps=1_000_000)
        task = asyncio.create_task(h.reconciler.run())
        h.reconciler.on_desired(DesiredState(1, slow))
        await h.until(lambda: h.store.partial_size(slow) > 0)
        h.reconciler.on_desired(DesiredState(2, v2))
        h.reconciler.on_desired(DesiredState(1, slow))  # stale: ignored
        await h.until(lambda: h.reported(2, "applied"), timeout=10)
        assert not [r for r in h.reports if r.version == 1 and r.status != "applying"]
        assert h.host.active is not None and h.host.active.name == "digits"
        assert h.store.partial_size(slow) == 0  # pruned: no longer wanted
        task.cancel()

    run(go)


def test_restore_falls_back_to_previous_when_active_is_gone(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    v1, v2 = onnx_ref(blob_server, digits_onnx, 1), onnx_ref(blob_server, digits_onnx_v2, 2)

    async def apply_both() -> None:
        h = Harness(tmp_path, blob_server)
        task = asyncio.create_task(h.reconciler.run())
        await h.apply(1, v1)
        await h.apply(2, v2)
        task.cancel()

    async def restore() -> None:
        h = Harness(tmp_path, blob_server)
        await h.reconciler.restore()
        assert h.host.active is not None and h.host.active.version == "1"
        assert h.reconciler.state.active == v1 and h.reconciler.state.previous is None

    run(apply_both)
    shutil.rmtree(tmp_path / "models" / "versions" / v2.sha256)
    run(restore)


@pytest.mark.parametrize(("attempt", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (10, 60.0)])
def test_backoff_is_exponential_and_capped(attempt: int, delay: float) -> None:
    assert Backoff(1.0, 60.0, jitter=0.0).delay(attempt) == delay
    jittered = [Backoff(1.0, 60.0, jitter=0.2).delay(attempt) for _ in range(50)]
    assert all(0.8 * delay <= d <= 1.2 * delay for d in jittered) and len(set(jittered)) > 1


def test_same_version_number_for_another_model_is_applied_after_restart(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    v1, v2 = onnx_ref(blob_server, digits_onnx, 1), onnx_ref(blob_server, digits_onnx_v2, 2)

    async def apply(ref: ModelVersionRef, restore: bool) -> None:
        h = Harness(tmp_path, blob_server)
        if restore:
            await h.reconciler.restore()
        task = asyncio.create_task(h.reconciler.run())
        await h.apply(1, ref)  # a controller that started numbering again
        assert h.host.active is not None and h.host.active.version == str(ref.version)
        task.cancel()

    asyncio.run(apply(v1, restore=False))
    asyncio.run(apply(v2, restore=True))


def test_reissued_desired_state_for_the_same_bytes_does_not_swap(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path
) -> None:
    import dataclasses

    v1 = onnx_ref(blob_server, digits_onnx, 1)
    moved = dataclasses.replace(v1, url=v1.url.replace("127.0.0.1", "localhost"))

    async def go() -> None:
        h = Harness(tmp_path, blob_server)
        task = asyncio.create_task(h.reconciler.run())
        await h.apply(1, v1)
        h.reconciler.drain_swap_events()
        before = len(h.reports)
        await h.apply(2, moved)
        assert [r.status for r in h.reports[before:]] == ["applied"]
        assert h.reconciler.drain_swap_events() == []
        assert h.reconciler.state.active == moved
        task.cancel()

    asyncio.run(go())


def test_entry_script_runs_only_from_the_verified_folder(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(digits_onnx, arcname="model.onnx")  # the signed artifact holds no score.py
    ref = blob_server.add(buf.getvalue(), name="digits", version=1, format="tar", entry_script="score.py")
    # a score.py where the agent happens to run: the scoring host would fall back to it
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    (workdir / "score.py").write_text("def init():\n    pass\n\n\ndef run(data):\n    return 'not from the artifact'\n")
    monkeypatch.chdir(workdir)

    async def go() -> None:
        h = Harness(tmp_path, blob_server)
        task = asyncio.create_task(h.reconciler.run())
        h.reconciler.on_desired(DesiredState(1, ref))
        await h.until(lambda: bool(h.reports) and h.reports[-1].status in ("applied", "failed"))
        last = h.reports[-1]
        assert last.status == "failed" and last.stage == "load", last
        assert str(h.store.version_dir(ref) / "score.py") in (last.reason or "")
        assert h.host.active is None
        task.cancel()

    run(go)


def test_desired_no_model_unloads_keeps_previous_and_rollback_brings_it_back(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path
) -> None:
    v1 = onnx_ref(blob_server, digits_onnx, 1)

    async def unload() -> None:
        h = Harness(tmp_path, blob_server)
        task = asyncio.create_task(h.reconciler.run())
        await h.apply(1, v1)
        h.reconciler.drain_swap_events()
        h.reconciler.on_desired(DesiredState(2, None))
        await h.until(lambda: h.reported(2, "applied"))
        last = h.reports[-1]
        assert last.active is None and last.previous is not None and last.previous.version == 1
        assert last.applied_version == 2
        assert h.host.active is None and not h.host.ready
        assert [(e["from"], e["to"], e["ok"]) for e in h.reconciler.drain_swap_events()] == [
            ("digits:1", None, True)
        ]
        assert h.store.is_installed(v1)  # kept on disk for a rollback
        task.cancel()

    async def restarted() -> None:
        h = Harness(tmp_path, blob_server)
        await h.reconciler.restore()
        assert h.host.active is None  # `previous` is for a rollback, not a fallback
        assert h.reconciler.state.active is None and h.reconciler.state.previous == v1
        task = asyncio.create_task(h.reconciler.run())
        h.reconciler.on_desired(DesiredState(2, None))  # the retained state again: re-reported
        await h.until(lambda: h.reported(2, "applied"))
        report = await h.reconciler.rollback()
        assert report.status == "failed" and report.stage == "rollback" and report.version == 2
        assert "from nothing to digits:1" in (report.reason or "")
        assert h.host.active is not None and h.host.active.version == "1"
        assert h.reconciler.state.active == v1 and h.reconciler.state.previous is None
        task.cancel()

    run(unload)
    run(restarted)


def test_desired_no_model_on_a_device_serving_nothing_is_applied_at_once(
    tmp_path: Path, blob_server: BlobServer
) -> None:
    async def go() -> None:
        h = Harness(tmp_path, blob_server)
        task = asyncio.create_task(h.reconciler.run())
        h.reconciler.on_desired(DesiredState(1, None))
        await h.until(lambda: h.reported(1, "applied"))
        assert [r.status for r in h.reports] == ["applied"]
        assert h.reports[-1].active is None and h.reports[-1].previous is None
        assert h.reconciler.drain_swap_events() == []
        task.cancel()

    run(go)


# --- power cuts beyond SIGKILL: what a restart finds on disk ------------------------------------


async def _apply_both(h: Harness, v1: ModelVersionRef, v2: ModelVersionRef) -> None:
    task = asyncio.create_task(h.reconciler.run())
    await h.apply(1, v1)
    await h.apply(2, v2)
    task.cancel()


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\0" * 512, b'{"active": {"name": "digits", "ver', b"null", b"[1, 2]", b'{"applied_version": "7"}'],
    ids=["empty", "zero-filled", "truncated", "null", "list", "wrong-type"],
)
def test_unreadable_state_file_is_set_aside_and_the_newest_verified_version_serves(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path, digits_onnx_v2: Path, garbage: bytes
) -> None:
    v1, v2 = onnx_ref(blob_server, digits_onnx, 1), onnx_ref(blob_server, digits_onnx_v2, 2)
    run(lambda: _apply_both(Harness(tmp_path, blob_server), v1, v2))
    (tmp_path / "state.json").write_bytes(garbage)

    async def restarted() -> None:
        h = Harness(tmp_path, blob_server)
        assert h.reconciler.state_file.lost is not None and "unreadable" in h.reconciler.state_file.lost
        await h.reconciler.restore()
        assert h.host.active is not None and h.host.active.version == "2"  # the newest installed, verified
        task = asyncio.create_task(h.reconciler.run())
        served = blob_server.served
        await h.apply(2, v2)  # the retained desired state: applied again (no download), reported applied
        assert blob_server.served == served
        assert h.reconciler.state.active == v2 and h.reconciler.state.handled(2, v2.sha256)
        task.cancel()

    run(restarted)
    assert (tmp_path / "state.corrupt").read_bytes() == garbage


def test_leftover_temp_and_partial_files_are_cleared_or_resumed_safely(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    v1, v2 = onnx_ref(blob_server, digits_onnx, 1), onnx_ref(blob_server, digits_onnx_v2, 2)

    async def first() -> None:
        h = Harness(tmp_path, blob_server)
        task = asyncio.create_task(h.reconciler.run())
        await h.apply(1, v1)
        task.cancel()

    run(first)
    models = tmp_path / "models"
    # a power cut mid-install, mid-write of state.json and of a manifest, and mid-download (with the
    # tail of the partial file never written: zeros where the data should be)
    (models / "versions" / ".tmp-0123456789abcdef-1-2").mkdir()
    (models / "versions" / ".tmp-0123456789abcdef-1-2" / "model.onnx").write_bytes(b"half")
    (tmp_path / "state.json.tmp").write_bytes(b'{"active": nul')
    (models / "manifests" / f"{v2.sha256}.json.tmp").write_bytes(b"{")
    size = digits_onnx_v2.stat().st_size
    (models / "partial" / f"{v2.sha256}.part").write_bytes(digits_onnx_v2.read_bytes()[: size // 2] + b"\0" * 100)

    async def restarted() -> None:
        h = Harness(tmp_path, blob_server)
        await h.reconciler.restore()
        assert h.host.active is not None and h.host.active.version == "1"
        assert not list((models / "versions").glob(".tmp-*"))
        assert not (tmp_path / "state.json.tmp").exists() and not list((models / "manifests").glob("*.tmp"))
        task = asyncio.create_task(h.reconciler.run())
        await h.apply(2, v2)  # resumed from the damaged bytes, refused, downloaded again from zero
        assert h.store.last_download.resumed_from == 0
        assert h.host.active is not None and h.host.active.version == "2"
        task.cancel()

    run(restarted)


def _damage(path: Path, how: str) -> None:
    if how == "bit-flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01  # still loads: only the checksum can tell
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "zero-length":
        path.write_bytes(b"")
    elif how == "file-deleted":
        path.unlink()
    else:
        shutil.rmtree(path.parent)


@pytest.mark.parametrize("how", ["bit-flip", "truncated", "zero-length", "file-deleted", "folder-deleted"])
def test_damaged_active_version_is_removed_the_previous_serves_and_the_desired_state_converges(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path, digits_onnx_v2: Path, how: str
) -> None:
    v1, v2 = onnx_ref(blob_server, digits_onnx, 1), onnx_ref(blob_server, digits_onnx_v2, 2)
    run(lambda: _apply_both(Harness(tmp_path, blob_server), v1, v2))
    _damage(tmp_path / "models" / "versions" / v2.sha256 / "model.onnx", how)

    async def restarted() -> None:
        h = Harness(tmp_path, blob_server)
        await h.reconciler.restore()
        assert h.host.active is not None and h.host.active.version == "1"
        [event] = h.reconciler.drain_swap_events()
        assert (event["to"], event["ok"], event["stage"]) == ("digits:2", False, "restore")
        assert "digits:2" in event["reason"] and ("changed on disk" in event["reason"]
                                                   or "cannot be read" in event["reason"]
                                                   or "is not on disk" in event["reason"])
        assert not h.store.is_installed(v2)  # damaged bytes are never loaded, nor kept
        assert h.reconciler.state.active == v1 and h.reconciler.state.handled_version is None
        task = asyncio.create_task(h.reconciler.run())
        served = blob_server.served
        await h.apply(2, v2)  # the retained desired state is due again: downloaded anew, applied
        assert blob_server.served > served
        assert h.host.active is not None and h.host.active.version == "2"
        assert h.reconciler.state.previous == v1
        task.cancel()

    run(restarted)


def test_when_no_version_verifies_the_agent_serves_none_says_why_and_converges(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    v1, v2 = onnx_ref(blob_server, digits_onnx, 1), onnx_ref(blob_server, digits_onnx_v2, 2)
    run(lambda: _apply_both(Harness(tmp_path, blob_server), v1, v2))
    for ref in (v1, v2):
        _damage(tmp_path / "models" / "versions" / ref.sha256 / "model.onnx", "bit-flip")

    async def restarted() -> None:
        h = Harness(tmp_path, blob_server)
        await h.reconciler.restore()
        assert h.host.active is None
        events = h.reconciler.drain_swap_events()
        assert [(e["to"], e["ok"], e["stage"]) for e in events] == [
            ("digits:2", False, "restore"), ("digits:1", False, "restore"),
        ]
        assert h.reconciler.state.active is None and h.reconciler.state.previous is None
        task = asyncio.create_task(h.reconciler.run())
        await h.apply(2, v2)
        assert h.host.active is not None and h.host.active.version == "2"
        task.cancel()

    run(restarted)


def test_a_damaged_previous_version_is_never_loaded_by_a_rollback_or_a_desired_state(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    """Restore checks only what it loads: the previous version's bytes are checked when it is used."""
    v1, v2 = onnx_ref(blob_server, digits_onnx, 1), onnx_ref(blob_server, digits_onnx_v2, 2)
    run(lambda: _apply_both(Harness(tmp_path, blob_server), v1, v2))
    _damage(tmp_path / "models" / "versions" / v1.sha256 / "model.onnx", "bit-flip")  # still loads

    async def restarted() -> None:
        h = Harness(tmp_path, blob_server)
        await h.reconciler.restore()
        assert h.host.active is not None and h.host.active.version == "2"
        with pytest.raises(CommandError, match=r"rollback to digits:1 refused: digits:1: model\.onnx changed on disk"):
            await h.reconciler.rollback()
        assert h.host.active is not None and h.host.active.version == "2"  # still serving
        assert not h.store.is_installed(v1)  # removed: a desired state for it downloads it anew

        task = asyncio.create_task(h.reconciler.run())
        served = blob_server.served
        await h.apply(3, v1)
        assert blob_server.served - served == v1.size
        assert h.host.active is not None and h.host.active.version == "1"
        task.cancel()

    run(restarted)


def test_an_installed_version_whose_bytes_changed_is_downloaded_again_before_it_is_served(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    v1, v2 = onnx_ref(blob_server, digits_onnx, 1), onnx_ref(blob_server, digits_onnx_v2, 2)
    run(lambda: _apply_both(Harness(tmp_path, blob_server), v1, v2))
    _damage(tmp_path / "models" / "versions" / v1.sha256 / "model.onnx", "bit-flip")

    async def restarted() -> None:
        h = Harness(tmp_path, blob_server)
        await h.reconciler.restore()
        task = asyncio.create_task(h.reconciler.run())
        served = blob_server.served
        await h.apply(3, v1)  # a fleet rollback to the version kept as previous
        assert blob_server.served - served == v1.size  # not the damaged copy
        served_file = tmp_path / "models" / "versions" / v1.sha256 / "model.onnx"
        assert served_file.read_bytes() == digits_onnx.read_bytes()
        task.cancel()

    run(restarted)


def test_restart_model_refuses_an_active_version_whose_bytes_changed(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path
) -> None:
    v1 = onnx_ref(blob_server, digits_onnx, 1)

    async def go() -> None:
        h = Harness(tmp_path, blob_server)
        task = asyncio.create_task(h.reconciler.run())
        await h.apply(1, v1)
        _damage(tmp_path / "models" / "versions" / v1.sha256 / "model.onnx", "bit-flip")
        with pytest.raises(CommandError, match=r"restart of digits:1 refused: digits:1: model\.onnx changed on disk"):
            await h.reconciler.restart_model()
        assert h.host.active is not None and h.host.active.version == "1"  # the loaded copy keeps serving
        task.cancel()

    run(go)


def test_a_missing_state_file_beside_installed_versions_serves_the_newest_verified_one(
    tmp_path: Path, blob_server: BlobServer, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    v1, v2 = onnx_ref(blob_server, digits_onnx, 1), onnx_ref(blob_server, digits_onnx_v2, 2)
    run(lambda: _apply_both(Harness(tmp_path, blob_server), v1, v2))
    (tmp_path / "state.json").unlink()  # lost with the folder entry a power cut did not keep

    async def restarted() -> None:
        h = Harness(tmp_path, blob_server)
        assert h.reconciler.state_file.lost is not None and "does not exist" in h.reconciler.state_file.lost
        await h.reconciler.restore()
        assert h.host.active is not None and h.host.active.version == "2"
        assert h.reconciler.state.active == v2 and h.reconciler.state.handled_version is None

    run(restarted)
    assert not (tmp_path / "state.corrupt").exists()
