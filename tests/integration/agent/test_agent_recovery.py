"""The agent under trouble: untrusted signatures, interrupted downloads, SIGKILL mid-swap, a broker outage."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_harness import (  # type: ignore[import-not-found]
    Controller,
    RegistryHandle,
    StallingArtifactServer,
    wait_until,
)

from modelfleet.deployer.registry.signing import generate_key_pair
from modelfleet.deployer.samples import digits_rows, pad_onnx

pytestmark = pytest.mark.mqtt
ROWS = digits_rows(1)


def serving_version(port: int) -> str:
    r = httpx.post(f"http://127.0.0.1:{port}/score", json={"data": ROWS}, timeout=10)
    assert r.status_code == 200, r.text
    return str(r.headers["x-model-version"])


def test_unsigned_or_untrusted_versions_are_refused_when_keys_are_configured(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path,
) -> None:
    trusted_private, trusted_public, trusted_id = generate_key_pair(tmp_path / "trusted")
    untrusted_private, _, _ = generate_key_pair(tmp_path / "untrusted")
    v1 = artifact_registry.register("digits", digits_onnx, sign_key=trusted_private)
    assert v1.key_id == trusted_id
    unsigned = artifact_registry.register("plain", digits_onnx_v2)
    forged = artifact_registry.register("digits", digits_onnx_v2, sign_key=untrusted_private)

    agent = agents("dev-sig", mosquitto.port, store_trusted_keys=[str(trusted_public)])
    controller.wait_reported("dev-sig", controller.desire("dev-sig", v1), "applied")
    port = agent.scoring_port

    d2 = controller.desire("dev-sig", unsigned)
    report = controller.wait_reported("dev-sig", d2, "failed")
    assert report.stage == "verify" and "unsigned" in (report.reason or "")
    assert serving_version(port) == "1"

    d3 = controller.desire("dev-sig", forged)
    report = controller.wait_reported("dev-sig", d3, "failed")
    assert report.stage == "verify" and "does not verify with any trusted key" in (report.reason or "")
    assert report.active is not None and report.active.version == 1
    assert serving_version(port) == "1"
    # refused before a single byte was fetched
    assert "event=download_done model=digits:2" not in agent.log_text()


def test_download_killed_midway_resumes_without_refetching_finished_bytes(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path, tmp_path: Path,
) -> None:
    big = pad_onnx(digits_onnx, tmp_path / "big" / "model.onnx", 6 * 1024 * 1024)
    ref = artifact_registry.register("big", big)
    agent = agents("dev-dl", mosquitto.port, store_download_limit_bps=3 * 1024 * 1024)
    wait_until(lambda: controller.presence.get("dev-dl"), 30, "birth message")
    d1 = controller.desire("dev-dl", ref)
    part = agent.store_dir / "models" / "partial" / f"{ref.sha256}.part"
    wait_until(lambda: part.exists() and part.stat().st_size > 1024 * 1024, 30, "a partial download")
    agent.kill()
    kept = part.stat().st_size
    assert 0 < kept < ref.size

    agent.reconfigure(store_download_limit_bps=0)
    agent.start()
    controller.wait_reported("dev-dl", d1, "applied")
    done = agent.wait_log(r"event=download_done model=big:1 \S+ resumed_from=(\d+) received=(\d+)")
    resumed_from, received = int(done.group(1)), int(done.group(2))
    assert resumed_from >= kept
    assert resumed_from + received == ref.size
    assert not part.exists()


def test_sigterm_during_a_stalled_download_exits_at_once_and_keeps_the_bytes(
    mosquitto: Any, controller: Controller, agents: Any, digits_onnx: Path,
) -> None:
    data = digits_onnx.read_bytes()
    half = len(data) // 2
    server = StallingArtifactServer(data, stall_after=half).start()
    try:
        ref = server.ref("digits", 1)
        agent = agents("dev-stall", mosquitto.port, store_timeout_s=30)
        d1 = controller.desire("dev-stall", ref)
        part = agent.store_dir / "models" / "partial" / f"{ref.sha256}.part"
        wait_until(lambda: part.exists() and part.stat().st_size == half, 30, "the bytes sent before the stall")
        started = time.monotonic()
        assert agent.terminate(timeout=10) == 0
        assert time.monotonic() - started < 3.0, "SIGTERM waited for the stalled read (store.timeout_s)"
        assert "event=agent_stopped" in agent.log_text()
        assert part.stat().st_size == half  # kept for a Range resume

        server.release()
        agent.start()
        controller.wait_reported("dev-stall", d1, "applied")
        assert server.ranges == [None, f"bytes={half}-"]
        assert serving_version(agent.scoring_port) == "1"
    finally:
        server.stop()


def test_sigkill_mid_swap_restarts_into_a_good_version_and_finishes(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path,
) -> None:
    v1 = artifact_registry.register("digits", digits_onnx)
    # big enough that loading it takes a moment, so the kill lands inside the swap
    v2 = artifact_registry.register("digits", pad_onnx(digits_onnx_v2, tmp_path / "v2" / "model.onnx", 30 << 20))
    agent = agents("dev-kill", mosquitto.port)
    controller.wait_reported("dev-kill", controller.desire("dev-kill", v1), "applied")
    d2 = controller.desire("dev-kill", v2)
    wait_until(
        lambda: (r := controller.last_reported("dev-kill")) is not None
        and r.version == d2 and r.stage == "load",
        60, "the load stage of v2",
    )
    agent.kill()

    agent.start()
    port = agent.scoring_port
    # serving straight away, from the last good version on disk (v1, or v2 if its swap was persisted)
    assert serving_version(port) in {"1", "2"}
    controller.wait_reported("dev-kill", d2, "applied", timeout=60)
    assert serving_version(port) == "2"


@pytest.fixture
def durable_broker(mosquitto: Any, tmp_path: Path) -> Iterator[Any]:
    """A broker that keeps sessions across its restart (persistence on), as deploy/mosquitto/ sets up."""
    mosquitto.stop()
    store = tmp_path / "broker-db"
    store.mkdir()
    broker = type(mosquitto)(
        tmp_path, extra_config=f"allow_anonymous true\nuser root\npersistence true\npersistence_location {store}/\n"
    )
    broker.start()
    yield broker
    broker.stop()


def test_broker_outage_queues_telemetry_and_delivers_all_in_order(
    durable_broker: Any, artifact_registry: RegistryHandle, agents: Any, digits_onnx: Path,
) -> None:
    # with a persistent controller session, whoever reconnects first, nothing is lost
    mosquitto = durable_broker
    controller = Controller(mosquitto.port, durable=True).start()
    v1 = artifact_registry.register("digits", digits_onnx)
    agent = agents("dev-tel", mosquitto.port, telemetry_interval_s=0.1)
    controller.wait_reported("dev-tel", controller.desire("dev-tel", v1), "applied")
    port = agent.scoring_port
    wait_until(lambda: len(controller.telemetry_records("dev-tel")) >= 2, 30, "telemetry before the outage")

    mosquitto.stop()
    queue_dir = agent.store_dir / "telemetry"
    for _ in range(5):  # traffic while offline is counted too
        serving_version(port)
    wait_until(lambda: len(list(queue_dir.glob("*.rec"))) >= 8, 30, "records queued on disk")
    queued_max = max(int(p.stem) for p in queue_dir.glob("*.rec"))
    mosquitto.start()  # same port

    def delivered() -> bool:
        seqs = {r["seq"] for r in controller.telemetry_records("dev-tel")}
        return queued_max in seqs

    try:
        wait_until(delivered, 30, "queued telemetry delivered")
    except AssertionError as exc:
        seen = sorted({r["seq"] for r in controller.telemetry_records("dev-tel")})
        raise AssertionError(f"{exc}; seen {seen}, want {queued_max}\n{agent.log_text()[-2500:]}") from None
    records = controller.telemetry_records("dev-tel")
    seqs = [r["seq"] for r in records]
    unique = sorted(set(seqs))
    assert unique == list(range(1, unique[-1] + 1)), "a telemetry record was lost"
    # oldest first: apart from at-least-once repeats, the order never goes back
    first_seen = list(dict.fromkeys(seqs))
    assert first_seen == sorted(first_seen)
    assert sum(r["requests"] for r in {r["seq"]: r for r in records}.values()) >= 5
    assert all(r["dropped"] == 0 for r in records)
    record = records[-1]
    assert record["device_id"] == "dev-tel" and record["rss_bytes"] > 0
    assert set(record["latency"]) >= {"buckets", "counts", "p50", "p90", "p99"}
    controller.stop()


def test_offline_queue_bound_drops_oldest_and_counts_every_missing_record(
    durable_broker: Any, agents: Any,
) -> None:
    controller = Controller(durable_broker.port, durable=True).start()
    agent = agents("dev-full", durable_broker.port, telemetry_interval_s=0.05, telemetry_queue_max_records=4)
    wait_until(lambda: controller.telemetry_records("dev-full"), 30, "telemetry before the outage")
    durable_broker.stop()
    meta = agent.store_dir / "telemetry" / "meta.json"
    wait_until(lambda: meta.exists() and json.loads(meta.read_text())["dropped"] >= 5, 30, "records dropped")
    durable_broker.start()
    dropped_then = json.loads(meta.read_text())["dropped"]

    def caught_up() -> dict[str, Any] | None:
        records = controller.telemetry_records("dev-full")
        late = [r for r in records if r["dropped"] >= dropped_then]
        return late[-1] if late else None

    wait_until(caught_up, 30, "telemetry after the outage")
    assert agent.terminate() == 0
    final = json.loads(meta.read_text())
    still_queued = {int(p.stem) for p in (agent.store_dir / "telemetry").glob("*.rec")}
    written = set(range(1, final["next_seq"]))
    received = {r["seq"] for r in controller.telemetry_records("dev-full")}
    # every record written either arrived, is still queued on disk, or was dropped and counted
    assert final["dropped"] >= dropped_then > 0
    assert len(written - received - still_queued) == final["dropped"]
    assert len(still_queued) <= 4
    controller.stop()


def test_sigterm_stops_cleanly_with_an_offline_presence(
    mosquitto: Any, controller: Controller, agents: Any,
) -> None:
    agent = agents("dev-term", mosquitto.port, device_tags={"site": "plant-1", "ring": 0})
    birth = wait_until(lambda: controller.presence.get("dev-term"), 30, "birth message")[0]
    assert birth.online and birth.tags == {"site": "plant-1", "ring": 0}
    started = time.monotonic()
    assert agent.terminate() == 0
    assert time.monotonic() - started < 10
    wait_until(lambda: controller.presence["dev-term"][-1].online is False, 10, "offline presence")
    assert re.search(r"event=agent_stopped device=dev-term", agent.log_text())


def test_killed_agent_leaves_its_last_will(mosquitto: Any, controller: Controller, agents: Any) -> None:
    agent = agents("dev-will", mosquitto.port, broker_keepalive_s=1)
    wait_until(lambda: controller.presence.get("dev-will"), 30, "birth message")
    agent.kill()
    wait_until(lambda: controller.presence["dev-will"][-1].online is False, 15, "last will")
    assert controller.presence["dev-will"][-1].clean is False


def test_sigkill_at_arbitrary_instants_always_restarts_into_a_good_version(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path,
) -> None:
    v1 = artifact_registry.register("digits", pad_onnx(digits_onnx, tmp_path / "v1" / "model.onnx", 20 << 20))
    v2 = artifact_registry.register("digits", pad_onnx(digits_onnx_v2, tmp_path / "v2" / "model.onnx", 20 << 20))
    agent = agents("dev-chaos", mosquitto.port)
    controller.wait_reported("dev-chaos", controller.desire("dev-chaos", v1), "applied", timeout=60)
    # the crash instant is the variable here (not a synchronisation): spread over the whole apply
    for i, delay in enumerate((0.0, 0.05, 0.15, 0.3, 0.6)):
        target = v2 if i % 2 == 0 else v1
        version = controller.desire("dev-chaos", target)
        time.sleep(delay)
        agent.kill()
        agent.start()
        port = agent.scoring_port
        assert serving_version(port) in {"1", "2"}
        controller.wait_reported("dev-chaos", version, "applied", timeout=60)
        assert serving_version(port) == str(target.version)


def test_agent_started_before_the_broker_connects_once_it_is_up(
    mosquitto: Any, artifact_registry: RegistryHandle, agents: Any, digits_onnx: Path, tmp_path: Path,
) -> None:
    late = type(mosquitto)(tmp_path / "late", extra_config="allow_anonymous true\nuser root\n")
    late.workdir.mkdir()
    agent = agents("dev-early", late.port)
    agent.wait_log(r"event=mqtt_connect_failed .*Connection refused")
    late.start()
    controller = Controller(late.port).start()
    try:
        v1 = artifact_registry.register("digits", digits_onnx)
        controller.wait_reported("dev-early", controller.desire("dev-early", v1), "applied")
    finally:
        controller.stop()
        late.stop()


def test_sigterm_during_a_download_exits_promptly_and_keeps_the_bytes(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path, tmp_path: Path,
) -> None:
    big = artifact_registry.register("big", pad_onnx(digits_onnx, tmp_path / "big" / "model.onnx", 8 << 20))
    agent = agents("dev-slow", mosquitto.port, store_download_limit_bps=1 << 20)
    wait_until(lambda: controller.presence.get("dev-slow"), 30, "birth message")
    controller.desire("dev-slow", big)
    part = agent.store_dir / "models" / "partial" / f"{big.sha256}.part"
    wait_until(lambda: part.exists() and part.stat().st_size > 0, 30, "a download in progress")
    started = time.monotonic()
    assert agent.terminate(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert 0 < part.stat().st_size < big.size  # resumable later


def test_power_cut_leaving_garbage_state_leftovers_and_a_damaged_active_version_converges(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path, digits_onnx_v2: Path,
) -> None:
    v1 = artifact_registry.register("digits", digits_onnx)
    v2 = artifact_registry.register("digits", digits_onnx_v2)
    agent = agents("dev-cut", mosquitto.port)
    controller.wait_reported("dev-cut", controller.desire("dev-cut", v1), "applied")
    d2 = controller.desire("dev-cut", v2)
    controller.wait_reported("dev-cut", d2, "applied")
    agent.kill()

    # what a power cut on a file system that loses data behind renames can leave
    store = agent.store_dir
    (store / "state.json").write_bytes(b"\0" * 300)
    (store / "state.json.tmp").write_bytes(b'{"act')
    (store / "models" / "versions" / ".tmp-feedfacefeedface-1-1").mkdir()
    active_file = store / "models" / "versions" / v2.sha256 / "model.onnx"
    active_file.write_bytes(active_file.read_bytes()[:-64])

    agent.start()
    port = agent.scoring_port
    # the newest installed version that verifies serves from the first request
    assert serving_version(port) in {"1", "2"}
    controller.wait_reported("dev-cut", d2, "applied", timeout=60)
    assert serving_version(port) == "2"
    log = agent.log_text()
    assert "event=state_unreadable" in log and "event=restore_refused model=digits:2" in log
    assert (store / "state.corrupt").exists() and not (store / "state.json.tmp").exists()
    assert not list((store / "models" / "versions").glob(".tmp-*"))

    def refused_in_telemetry() -> bool:
        return any(
            s.get("to") == "digits:2" and s.get("ok") is False and s.get("stage") == "restore"
            and "changed on disk" in (s.get("reason") or "")
            for rec in controller.telemetry_records("dev-cut") for s in rec["swaps"]
        )

    wait_until(refused_in_telemetry, 15, "the refused restore in telemetry")
