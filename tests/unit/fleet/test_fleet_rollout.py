"""The rollout engine over the in-memory backend: staging, gates, rollback, persistence, conflicts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from modelfleet.agent.modelref import ModelVersionRef
from modelfleet.deployer.fleet.backends.memory import MemoryFleetBackend
from modelfleet.deployer.fleet.rollout import (
    RolloutEngine,
    RolloutSpec,
    parse_duration,
    parse_ratio,
    parse_stages,
    rollout_order,
    stage_sizes,
)
from modelfleet.deployer.fleet.store import FleetError, FleetStore, RolloutConflictError

SHA1 = "1" * 64
SHA2 = "2" * 64


def ref(version: int, sha: str = SHA2) -> ModelVersionRef:
    return ModelVersionRef(name="digits", version=version, url="http://127.0.0.1:1/a", sha256=sha, size=10)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[RolloutEngine, MemoryFleetBackend, Clock]:
    backend = MemoryFleetBackend()
    for i in range(10):
        backend.add(f"dev-{i:02d}", tags={"site": "a" if i < 8 else "b"})
    backend.set_desired({f"dev-{i:02d}": ref(1, SHA1) for i in range(10)})
    for i in range(10):
        backend.report(f"dev-{i:02d}", "applied")
    clock = Clock()
    return RolloutEngine(FleetStore(tmp_path), backend, clock=clock), backend, clock


def apply_all(backend: MemoryFleetBackend, engine: RolloutEngine, name: str, status: str = "applied") -> None:
    for d in engine.store.devices(name, states=("pending",)):
        backend.report(d.device_id, status, reason=None if status == "applied" else "boom", stage="warmup")


def test_order_is_stable_and_depends_on_the_rollout_name() -> None:
    ids = [f"d{i}" for i in range(50)]
    assert rollout_order("r1", ids) == rollout_order("r1", list(reversed(ids)))
    assert rollout_order("r1", ids) != rollout_order("r2", ids)


def test_stage_sizes_are_cumulative_with_at_least_one_new_device() -> None:
    assert stage_sizes(10, [10, 50, 100]) == [1, 5, 10]
    assert stage_sizes(3, [1, 10, 50, 100]) == [1, 2, 3, 3]
    assert stage_sizes(1000, [1, 10, 100]) == [10, 100, 1000]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,x,100", "'x' is not a whole percentage"),
        ("10,5,100", "5 does not increase on 10"),
        ("10,50", "the last stage must be 100"),
        ("0,100", "0 is outside 1..100"),
    ],
)
def test_bad_stages_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(FleetError, match=message):
        parse_stages(text)


def test_durations_and_ratios_parse_and_refuse_nonsense() -> None:
    assert parse_duration("2m", "--soak") == 120
    assert parse_duration("500ms", "--soak") == 0.5
    assert parse_ratio("5%", "--max-failure") == pytest.approx(0.05)
    with pytest.raises(FleetError, match="--soak: 'soon' is not a duration"):
        parse_duration("soon", "--soak")
    with pytest.raises(FleetError, match="--max-failure: '150%' must be between"):
        parse_ratio("150%", "--max-failure")


def test_three_stage_rollout_moves_stage_by_stage_and_succeeds(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, _ = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(10, 50, 100)))
    seen_pending = []
    for _ in range(20):
        r = engine.step("r")
        if r.state != "running":
            break
        pending = engine.store.devices("r", states=("pending",))
        seen_pending.append(len(pending))
        apply_all(backend, engine, "r")
    assert r.state == "succeeded", r.reason
    assert [n for n in seen_pending if n] == [1, 4, 5]
    assert all(d.desired == ref(2) and d.active == "digits:2" for d in backend.devices())
    assert [s["result"] for s in r.stage_log] == ["passed"] * 3


def test_failed_canary_halts_at_stage_one_and_rolls_it_back(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, _ = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(10, 100), max_failure=0.05))
    engine.step("r")
    apply_all(backend, engine, "r", status="failed")
    r = engine.step("r")
    assert r.state == "failed"
    assert "stage 1: 1 of 1 devices failed" in (r.reason or "")
    assert "warmup: boom" in (r.reason or "")
    canary = engine.store.devices("r", stage=0)[0]
    assert canary.state == "rolled_back"
    assert backend.device(canary.device_id).desired == ref(1, SHA1)  # type: ignore[union-attr]
    untouched = [d for d in backend.devices() if d.device_id != canary.device_id]
    assert all(d.desired == ref(1, SHA1) for d in untouched)
    assert len(backend.published) == 10 + 2  # initial + canary + its rollback


def test_failures_within_budget_let_the_stage_pass(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, _ = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(100,), max_failure=0.2))
    engine.step("r")
    pending = engine.store.devices("r", states=("pending",))
    backend.report(pending[0].device_id, "failed", reason="disk full", stage="download")
    for d in pending[1:]:
        backend.report(d.device_id, "applied")
    r = engine.step("r")
    assert r.state == "succeeded"


def test_offline_device_is_pending_until_timeout_then_counts_as_failed(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, clock = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(100,), max_failure=0.1, timeout_s=60))
    engine.step("r")
    offline = engine.store.devices("r", states=("pending",))[0].device_id
    backend.set_online(offline, False)
    for d in engine.store.devices("r", states=("pending",)):
        if d.device_id != offline:
            backend.report(d.device_id, "applied")
    clock.now += 30
    r = engine.step("r")
    assert r.state == "running"
    assert [d.device_id for d in engine.store.devices("r", states=("pending",))] == [offline]
    clock.now += 31
    r = engine.step("r")
    assert r.state == "succeeded"  # 1 of 10 is within 10%
    late = engine.store.devices("r", states=("timeout",))
    assert [d.device_id for d in late] == [offline]
    assert late[0].reason == "offline, no report within 60s"
    # its desired state stays: it converges when it comes back
    assert backend.device(offline).desired == ref(2)  # type: ignore[union-attr]


def test_telemetry_gate_fails_the_soak_and_rolls_back(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, clock = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(20, 100), soak_s=60, max_error_rate=0.05))
    engine.step("r")
    apply_all(backend, engine, "r")
    r = engine.step("r")
    assert r.phase == "soaking"
    stage = [d.device_id for d in engine.store.devices("r", stage=0)]
    clock.now += 10
    backend.add_telemetry(stage[0], requests=100, errors=30)
    r = engine.step("r")
    assert r.state == "failed"
    assert "telemetry gate: error rate 30.0% (30/100 requests) above 5.0%" in (r.reason or "")
    assert all(backend.device(d).desired == ref(1, SHA1) for d in stage)  # type: ignore[union-attr]


def test_p99_gate(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, _ = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(100,), soak_s=60, max_p99_ms=50))
    engine.step("r")
    apply_all(backend, engine, "r")
    engine.step("r")
    backend.add_telemetry("dev-00", requests=100, errors=0, p99_ms=80.0)
    r = engine.step("r")
    assert r.state == "failed"
    assert "p99 latency 80.0 ms above 50 ms" in (r.reason or "")


def test_healthy_soak_passes_after_its_duration(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, clock = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(100,), soak_s=60, max_p99_ms=50))
    engine.step("r")
    apply_all(backend, engine, "r")
    engine.step("r")
    backend.add_telemetry("dev-00", requests=100, errors=1, p99_ms=20.0)
    clock.now += 59
    assert engine.step("r").state == "running"
    clock.now += 2
    assert engine.step("r").state == "succeeded"


def test_state_survives_a_new_engine_and_resumes(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock], tmp_path: Path) -> None:
    engine, backend, clock = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(10, 100)))
    engine.step("r")
    apply_all(backend, engine, "r")
    # the controlling process dies; a new one picks the rollout up from the database
    fresh = RolloutEngine(FleetStore(tmp_path), backend, clock=clock)
    for _ in range(5):
        r = fresh.step("r")
        apply_all(backend, fresh, "r")
    assert r.state == "succeeded"


def test_conflicting_rollout_is_refused_with_the_reason(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, _, _ = fleet
    engine.create(RolloutSpec("first", ref(2), target="tags.site = 'b'"))
    with pytest.raises(RolloutConflictError) as err:
        engine.create(RolloutSpec("second", ref(3), target="*"))
    assert "conflicts with rollout 'first' (running): device 'dev-08' (and 1 more devices) is already in it" in str(err.value)
    # a disjoint target is fine
    engine.create(RolloutSpec("third", ref(3), target="tags.site = 'a'"))
    engine.abort("first")
    engine.create(RolloutSpec("fourth", ref(4), target="tags.site = 'b'"))


def test_bad_create_inputs_are_refused(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, _, _ = fleet
    with pytest.raises(FleetError, match="matches no known device"):
        engine.create(RolloutSpec("r", ref(2), target="tags.site = 'nowhere'"))
    with pytest.raises(FleetError, match="rollout name 'bad name' is invalid"):
        engine.create(RolloutSpec("bad name", ref(2)))
    with pytest.raises(FleetError, match="--timeout: 0s leaves devices no time to report"):
        engine.create(RolloutSpec("r", ref(2), timeout_s=0))
    with pytest.raises(FleetError, match="--max-p99-ms: -5 is not a latency limit"):
        engine.create(RolloutSpec("r", ref(2), max_p99_ms=-5))
    assert engine.store.all() == []
    engine.create(RolloutSpec("r", ref(2), target="tags.site = 'a'"))
    with pytest.raises(FleetError, match="a rollout named 'r' already exists"):
        engine.create(RolloutSpec("r", ref(2), target="tags.site = 'b'"))


def test_pause_stops_progress_and_resume_continues(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, _ = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(10, 100)))
    engine.step("r")
    engine.pause("r")
    apply_all(backend, engine, "r")
    assert engine.step("r").state == "paused"
    assert len(engine.store.devices("r", states=("waiting",))) == 9
    with pytest.raises(FleetError, match="only a running rollout can be paused"):
        engine.pause("r")
    engine.resume("r")
    for _ in range(4):
        r = engine.step("r")
        apply_all(backend, engine, "r")
    assert r.state == "succeeded"
    with pytest.raises(FleetError, match="only a paused or running rollout can be resumed"):
        engine.resume("r")


def test_operator_rollback_restores_every_touched_device(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, _ = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(50, 100)))
    for _ in range(4):
        engine.step("r")
        apply_all(backend, engine, "r")
    assert engine.store.get("r").state == "succeeded"
    r = engine.rollback("r")
    assert r.state == "rolled_back"
    assert all(d.desired == ref(1, SHA1) for d in backend.devices())
    with pytest.raises(FleetError, match="already rolled back"):
        engine.rollback("r")


def test_status_view_has_stages_and_devices(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, _, _ = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(10, 100)))
    engine.step("r")
    view = engine.status("r")
    assert view["stages"][0] == {"stage": 1, "percent": 10, "cumulative_devices": 1, "devices": 1, "states": {"pending": 1}}
    assert view["stages"][1]["states"] == {"waiting": 9}
    assert view["devices"][0]["previous"] == "digits:1"


def test_driving_a_rollout_twice_at_once_is_refused(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, _, _ = fleet
    engine.create(RolloutSpec("r", ref(2)))
    with engine.lease("r"), pytest.raises(FleetError, match="already driven by another process"):
        engine.drive("r")


def test_device_outcome_follows_the_issued_desired_version() -> None:
    from modelfleet.deployer.fleet.backends.base import DeviceInfo

    assert DeviceInfo("d", status="applying", report_version=7).outcome(7) == "pending"
    assert DeviceInfo("d", status="applied", report_version=7).outcome(7) == "applied"
    assert DeviceInfo("d", status="failed", report_version=7).outcome(7) == "failed"
    # a report about an older desired state says nothing about ours
    assert DeviceInfo("d", status="failed", report_version=6, applied_version=5).outcome(7) == "pending"
    # already past it (a newer desired state was applied)
    assert DeviceInfo("d", status="applying", report_version=9, applied_version=8).outcome(7) == "applied"


def test_change_log_reads_from_a_cursor() -> None:
    from modelfleet.deployer.fleet.backends.base import ChangeLog

    log = ChangeLog()
    cursor, seen = log.read(None)
    assert seen == []
    log.add("a")
    log.add("b")
    cursor, seen = log.read(cursor)
    assert seen == ["a", "b"]
    log.add("a")
    assert log.read(cursor) == (3, ["a"])


def test_rollback_waits_for_a_live_controller_to_let_go(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    import threading

    engine, backend, _ = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(100,), timeout_s=3600))
    done: list[str] = []

    def controller() -> None:
        done.append(RolloutEngine(engine.store, backend, clock=engine.clock).drive("r", poll=0.01, batch=0.0).state)

    thread = threading.Thread(target=controller)
    thread.start()
    wait_for = time.monotonic() + 5
    while not engine.store.devices("r", states=("pending",)) and time.monotonic() < wait_for:
        time.sleep(0.01)
    r = engine.rollback("r")
    thread.join(5)
    assert done == ["rolled_back"]
    assert r.state == "rolled_back"
    assert all(d.state == "rolled_back" for d in engine.store.devices("r"))
    assert all(d.desired == ref(1, SHA1) for d in backend.devices())


def test_a_rollback_that_cannot_reach_the_devices_leaves_the_rollout_as_it_was(
    fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, backend, _ = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(50, 100)))
    engine.step("r")

    def broker_gone(assignments: object) -> dict[str, int]:
        raise FleetError("cannot reach the MQTT broker")

    with monkeypatch.context() as patch:
        patch.setattr(backend, "set_desired", broker_gone)
        with pytest.raises(FleetError, match="cannot reach the MQTT broker"):
            engine.rollback("r")
    assert engine.store.get("r").state == "running"  # not 'rolled_back' with the devices still on v2
    assert engine.store.devices("r", states=("pending",))
    assert engine.rollback("r").state == "rolled_back"  # once the broker is back, the rollback goes through
    assert all(d.desired == ref(1, SHA1) for d in backend.devices())


def test_a_full_disk_is_named_and_stores_nothing(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, _ = fleet
    with engine.store._connect() as conn:  # the database may not grow by a single page: a full disk
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
    for i in range(10, 400):
        backend.add(f"dev-{i:03d}-{'x' * 40}")
    with pytest.raises(FleetError, match=r"fleet state in .*registry\.db: database or disk is full"):
        engine.create(RolloutSpec("r", ref(2)))
    assert engine.store.all() == []
    assert backend.published[-1][1] == ref(1, SHA1)  # nothing was sent to a device


def test_rollback_is_refused_while_another_rollout_holds_its_devices(
    fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock],
) -> None:
    engine, backend, _ = fleet
    engine.create(RolloutSpec("old", ref(2), target="tags.site = 'a'"))
    engine.step("old")
    apply_all(backend, engine, "old")
    assert engine.step("old").state == "succeeded"
    engine.create(RolloutSpec("new", ref(3, "3" * 64), target="*", soak_s=3600))
    engine.step("new")
    with pytest.raises(
        RolloutConflictError,
        match=r"rollout 'old' cannot be rolled back while rollout 'new' \(running\): device 'dev-00' \(and 7 more devices\)",
    ):
        engine.rollback("old")
    assert engine.store.get("old").state == "succeeded"
    assert all(d.desired == ref(3, "3" * 64) for d in backend.devices())  # the running rollout's, untouched
    engine.abort("new")
    assert engine.rollback("old").state == "rolled_back"


@pytest.mark.parametrize("restart", [False, True], ids=["same-controller", "killed-controller"])
def test_paused_time_does_not_count_against_the_stage_timeout(
    fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock], tmp_path: Path, restart: bool
) -> None:
    engine, backend, clock = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(100,), max_failure=0.1, timeout_s=60))
    engine.step("r")
    offline = engine.store.devices("r", states=("pending",))[0].device_id
    backend.set_online(offline, False)
    for d in engine.store.devices("r", states=("pending",)):
        if d.device_id != offline:
            backend.report(d.device_id, "applied")
    clock.now += 30
    assert engine.step("r").state == "running"
    engine.pause("r")
    clock.now += 1000  # paused far past the timeout
    assert engine.step("r").state == "paused"
    if restart:  # the controller died while paused; a new one resumes from the database
        engine = RolloutEngine(FleetStore(tmp_path), backend, clock=clock)
    engine.resume("r")
    r = engine.step("r")
    assert r.state == "running"
    assert [d.device_id for d in engine.store.devices("r", states=("pending",))] == [offline]
    assert engine.status("r")["stage_elapsed_s"] == 30
    clock.now += 29
    assert engine.step("r").state == "running"
    clock.now += 2
    r = engine.step("r")
    assert r.state == "succeeded"
    assert [d.device_id for d in engine.store.devices("r", states=("timeout",))] == [offline]


def test_a_failed_stage_logs_its_watched_seconds_beside_the_wall_clock(
    fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock],
) -> None:
    engine, _, clock = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(100,), timeout_s=60))
    engine.step("r")
    clock.now += 30
    engine.step("r")
    engine.pause("r")
    clock.now += 1000
    engine.step("r")
    engine.resume("r")
    engine.step("r")
    clock.now += 31
    r = engine.step("r")
    assert r.state == "failed"
    entry = r.stage_log[-1]
    assert (entry["result"], entry["watched_s"], entry["seconds"]) == ("failed", 61, 1061)


def test_a_timed_out_device_that_applies_later_is_shown_as_late(
    fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock],
) -> None:
    engine, backend, clock = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(100,), max_failure=0.1, timeout_s=60))
    engine.step("r")
    offline = engine.store.devices("r", states=("pending",))[0].device_id
    backend.set_online(offline, False)
    for d in engine.store.devices("r", states=("pending",)):
        if d.device_id != offline:
            backend.report(d.device_id, "applied")
    clock.now += 61
    r = engine.step("r")
    assert r.state == "succeeded"
    verdict = list(r.stage_log)
    assert engine.converged_late("r") == []  # still not there
    backend.set_online(offline, True)
    backend.report(offline, "applied")
    assert engine.converged_late("r") == [offline]
    view = engine.status("r")
    late = next(d for d in view["devices"] if d["device_id"] == offline)
    assert late["state"] == "late"
    assert late["reason"] == "applied after its stage timed out (offline, no report within 60s)"
    assert view["stages"][0]["states"] == {"applied": 9, "late": 1}
    assert view["stage_log"] == verdict  # the stage's verdict is not revisited
    assert engine.converged_late("r") == []


def test_a_device_rolled_back_after_status_read_it_as_timed_out_is_not_marked_late(
    fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, backend, clock = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(100,), max_failure=0.1, timeout_s=60))
    engine.step("r")
    offline = engine.store.devices("r", states=("pending",))[0].device_id
    backend.set_online(offline, False)
    for d in engine.store.devices("r", states=("pending",)):
        if d.device_id != offline:
            backend.report(d.device_id, "applied")
    clock.now += 61
    assert engine.step("r").state == "succeeded"
    backend.set_online(offline, True)
    backend.report(offline, "applied")  # converged: it serves the rollout's version
    # `rollout status` read the timed-out devices, then the rollout was rolled back before it wrote
    stale = engine.store.timed_out("r")
    engine.rollback("r")
    monkeypatch.setattr(engine.store, "timed_out", lambda name: stale)
    assert engine.converged_late("r") == []
    [row] = [d for d in engine.store.devices("r") if d.device_id == offline]
    assert row.state == "rolled_back"


def test_a_device_that_applies_after_its_stage_timed_out_turns_late_while_the_rollout_goes_on(
    fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock],
) -> None:
    engine, backend, clock = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(20, 100), max_failure=0.5, timeout_s=60))
    engine.step("r")
    slow, fast = (d.device_id for d in engine.store.devices("r", states=("pending",)))
    backend.report(fast, "applied")
    clock.now += 61
    r = engine.step("r")
    assert r.stage == 1 and [e["result"] for e in r.stage_log] == ["passed"]
    engine.step("r")  # stage 2 issues
    backend.report(slow, "applied")  # the canary that timed out in stage 1 gets there
    engine.step("r")
    assert engine.store.devices("r", stage=0, states=("late",))[0].device_id == slow
    apply_all(backend, engine, "r")
    assert engine.step("r").state == "succeeded"


def test_a_device_now_serving_another_version_is_not_taken_for_late(
    fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock],
) -> None:
    engine, backend, clock = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(100,), max_failure=0.1, timeout_s=60))
    engine.step("r")
    slow = engine.store.devices("r", states=("pending",))[0].device_id
    for d in engine.store.devices("r", states=("pending",))[1:]:
        backend.report(d.device_id, "applied")
    clock.now += 61
    assert engine.step("r").state == "succeeded"
    backend.set_desired({slow: ref(3, "3" * 64)})  # set by hand to something else meanwhile
    backend.report(slow, "applied")
    assert engine.converged_late("r") == []


def _soaking(engine: RolloutEngine, backend: MemoryFleetBackend, spec: RolloutSpec) -> None:
    engine.create(spec)
    engine.step(spec.name)
    apply_all(backend, engine, spec.name)
    assert engine.step(spec.name).phase == "soaking"


def test_a_resumed_controller_continues_the_remaining_soak(
    fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock], tmp_path: Path
) -> None:
    engine, backend, clock = fleet
    _soaking(engine, backend, RolloutSpec("r", ref(2), stages=(100,), soak_s=60))
    clock.now += 40
    assert engine.step("r").state == "running"
    # the controller is killed 40 s into the soak and resumed much later: 20 s remain,
    # neither the whole soak again nor none (nobody watched the telemetry meanwhile)
    clock.now += 3600
    fresh = RolloutEngine(FleetStore(tmp_path), backend, clock=clock)
    assert fresh.step("r").state == "running"
    assert fresh.status("r")["soak_elapsed_s"] == 40
    clock.now += 19
    assert fresh.step("r").state == "running"
    clock.now += 2
    assert fresh.step("r").state == "succeeded"


def test_pausing_during_the_soak_does_not_count_as_soaked(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, clock = fleet
    _soaking(engine, backend, RolloutSpec("r", ref(2), stages=(100,), soak_s=60))
    clock.now += 10
    engine.step("r")
    engine.pause("r")
    clock.now += 600
    engine.step("r")
    engine.resume("r")
    assert engine.step("r").state == "running"
    clock.now += 51
    assert engine.step("r").state == "succeeded"


def test_a_soak_without_traffic_passes_with_a_warning(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, clock = fleet
    _soaking(engine, backend, RolloutSpec("r", ref(2), stages=(100,), soak_s=60))
    clock.now += 61
    r = engine.step("r")
    assert r.state == "succeeded"
    assert r.stage_log[0]["warning"] == "soak saw no traffic"
    assert r.stage_log[0]["soak_requests"] == 0
    assert engine.status("r")["warnings"] == ["stage 1: soak saw no traffic"]


def test_a_soak_with_traffic_has_no_warning(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, clock = fleet
    _soaking(engine, backend, RolloutSpec("r", ref(2), stages=(100,), soak_s=60))
    backend.add_telemetry("dev-03", requests=7, errors=0)
    clock.now += 61
    r = engine.step("r")
    assert r.state == "succeeded"
    assert "warning" not in r.stage_log[0] and r.stage_log[0]["soak_requests"] == 7
    assert engine.status("r")["warnings"] == []


def test_min_soak_requests_holds_the_stage_until_enough_traffic(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, clock = fleet
    _soaking(engine, backend, RolloutSpec("r", ref(2), stages=(100,), soak_s=60, timeout_s=600, min_soak_requests=50))
    backend.add_telemetry("dev-01", requests=30, errors=0)
    clock.now += 61
    assert engine.step("r").state == "running"  # soaked long enough, but only 30 requests
    backend.add_telemetry("dev-02", requests=25, errors=0)
    r = engine.step("r")
    assert r.state == "succeeded"
    assert r.stage_log[0]["soak_requests"] == 55


def test_min_soak_requests_not_reached_fails_the_stage_at_its_timeout(
    fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock],
) -> None:
    engine, backend, clock = fleet
    _soaking(engine, backend, RolloutSpec("r", ref(2), stages=(20, 100), soak_s=60, timeout_s=300, min_soak_requests=50))
    stage = [d.device_id for d in engine.store.devices("r", stage=0)]
    backend.add_telemetry(stage[0], requests=3, errors=0)
    clock.now += 200
    assert engine.step("r").state == "running"
    clock.now += 101
    r = engine.step("r")
    assert r.state == "failed"
    assert r.reason == (
        "stage 1: its devices served 3 requests during the soak, fewer than --min-soak-requests 50, "
        "within 300s — its devices were rolled back"
    )
    assert all(backend.device(d).desired == ref(1, SHA1) for d in stage)  # type: ignore[union-attr]


def test_negative_min_soak_requests_is_refused(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, _, _ = fleet
    with pytest.raises(FleetError, match="--min-soak-requests: -1 is not a request count"):
        engine.create(RolloutSpec("r", ref(2), min_soak_requests=-1))


def test_devices_that_join_the_target_go_out_with_the_next_stage(fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock]) -> None:
    engine, backend, _ = fleet
    engine.create(RolloutSpec("r", ref(2), target="tags.site = 'a'", stages=(10, 100)))
    engine.step("r")
    apply_all(backend, engine, "r")
    # during stage 1: a new device connects with the tag, and an existing one is tagged centrally
    backend.add("dev-20", tags={"site": "a"})
    backend.set_desired({"dev-20": ref(1, SHA1)})
    backend.report("dev-20", "applied")
    engine.store.set_tags("dev-09", {"site": "a"})
    r = engine.step("r")  # stage 1 passes
    assert r.stage == 1
    r = engine.step("r")  # stage 2 starts: the target is evaluated again
    devices = engine.store.devices("r")
    assert len(devices) == 10
    joined = [d for d in devices if d.joined]
    assert [d.device_id for d in joined] == rollout_order("r", ["dev-09", "dev-20"])
    assert [d.position for d in joined] == [8, 9] and {d.stage for d in joined} == {1}
    assert {d.state for d in joined} == {"pending"}
    assert all(d.previous == ref(1, SHA1) for d in joined)  # remembered for a rollback
    apply_all(backend, engine, "r")
    r = engine.step("r")
    assert r.state == "succeeded"
    assert r.stage_log[-1]["devices"] == 9
    view = engine.status("r")
    assert view["joined"] == 2
    assert view["stages"][1]["cumulative_devices"] == 10
    assert backend.device("dev-20").active == "digits:2"  # type: ignore[union-attr]


def test_a_device_that_joins_during_the_last_stage_is_taken_in_before_success(
    fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock],
) -> None:
    engine, backend, clock = fleet
    engine.create(RolloutSpec("r", ref(2), target="tags.site = 'b'", stages=(100,), timeout_s=60))
    engine.step("r")
    apply_all(backend, engine, "r")
    backend.add("dev-30", tags={"site": "b"})
    clock.now += 50
    r = engine.step("r")  # would succeed; the target grew, so the stage runs again
    assert (r.state, r.phase, r.stage_log) == ("running", "deploying", [])
    clock.now += 50
    r = engine.step("r")
    assert [d.device_id for d in engine.store.devices("r", states=("pending",))] == ["dev-30"]
    clock.now += 50  # a fresh timeout for the rerun stage
    assert engine.step("r").state == "running"
    apply_all(backend, engine, "r")
    r = engine.step("r")
    assert r.state == "succeeded"
    assert [(e["stage"], e["devices"], e["result"]) for e in r.stage_log] == [(1, 3, "passed")]


def test_joining_devices_held_by_another_rollout_stay_out_and_nothing_joins_after_success(
    fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock],
) -> None:
    engine, backend, _ = fleet
    backend.add("dev-40", tags={"site": "c"})
    engine.create(RolloutSpec("other", ref(3, "3" * 64), target="tags.site = 'c'", soak_s=3600))
    engine.create(RolloutSpec("r", ref(2), target="tags.site = 'b'", stages=(100,)))
    engine.step("r")
    apply_all(backend, engine, "r")
    engine.store.set_tags("dev-40", {"site": "b"})  # now matches 'r' too, but 'other' holds it
    r = engine.step("r")
    assert r.state == "succeeded"
    assert "dev-40" not in engine.store.member_ids("r")
    backend.add("dev-41", tags={"site": "b"})
    assert engine.step("r").state == "succeeded"
    assert "dev-41" not in engine.store.member_ids("r")


def test_rolling_back_a_device_that_had_no_model_tells_it_to_serve_none(tmp_path: Path) -> None:
    backend = MemoryFleetBackend()
    for i in range(2):
        backend.add(f"new-{i}")  # fresh devices: no desired state, nothing served
    engine = RolloutEngine(FleetStore(tmp_path), backend)
    engine.create(RolloutSpec("r", ref(2), stages=(50, 100)))
    engine.step("r")
    [canary] = engine.store.devices("r", states=("pending",))
    backend.report(canary.device_id, "applied")
    assert backend.device(canary.device_id).active == "digits:2"  # type: ignore[union-attr]
    engine.step("r")
    engine.abort("r")
    r = engine.rollback("r")
    assert r.state == "rolled_back"
    dev, published, version = backend.published[-1]
    assert (dev, published) == (canary.device_id, None)  # "model": null, with a fresh `$version`
    [row] = engine.store.devices("r", states=("rolled_back",))
    assert row.desired_version == version
    assert row.reason == "rolled back to no model (it had none before): the device unloads the rollout's version"
    backend.report(canary.device_id, "applied")  # the agent unloads and reports applied, nothing active
    info = backend.device(canary.device_id)
    assert info is not None and info.active is None and info.outcome(version) == "applied"
    assert info.serves_no_model_desired
    assert engine.status("r")["devices"][0]["previous"] is None
    # what `rollout status` does with a backend: the applied/null report confirms the rollback
    assert engine.confirm_rollbacks("r") == [canary.device_id]
    [row] = engine.store.devices("r", states=("rolled_back",))
    assert row.confirmed and (row.reason or "").endswith("; it serves no model now")
    assert engine.confirm_rollbacks("r") == []


def test_a_rollback_is_confirmed_by_the_device_report_or_named_as_refused(
    fleet: tuple[RolloutEngine, MemoryFleetBackend, Clock],
) -> None:
    engine, backend, _ = fleet
    engine.create(RolloutSpec("r", ref(2), stages=(20, 100)))
    engine.step("r")
    apply_all(backend, engine, "r", status="failed")
    assert engine.step("r").state == "failed"
    good, bad = (d.device_id for d in engine.store.devices("r", states=("rolled_back",)))
    assert engine.confirm_rollbacks("r") == []  # nobody reported on the rollback yet
    backend.report(good, "applied")
    backend.report(bad, "failed", reason="disk full", stage="download")
    assert sorted(engine.confirm_rollbacks("r")) == sorted([good, bad])
    reasons = {d.device_id: d.reason for d in engine.store.devices("r", states=("rolled_back",))}
    assert reasons[good] == "warmup: boom; rolled back to digits:1; it serves digits:1 again"
    assert reasons[bad] == "warmup: boom; rolled back to digits:1; the device refused the rollback: download: disk full"
    assert all(d["confirmed"] for d in engine.status("r")["devices"] if d["state"] == "rolled_back")


def test_a_fleet_database_from_before_gains_the_new_columns(tmp_path: Path) -> None:
    import json
    import sqlite3

    from modelfleet.deployer.fleet import store as store_module

    old_schema = "\n".join(
        line
        for line in store_module._SCHEMA.splitlines()
        if not any(f"    {col} " in line for cols in store_module._ADDED_COLUMNS.values() for col in cols)
    )
    with sqlite3.connect(tmp_path / "registry.db") as db:
        db.executescript(old_schema)
        db.execute(
            "INSERT INTO fleet_rollouts (name, model, target, stages, max_failure, soak_s, timeout_s, max_error_rate, "
            "state, created_at, updated_at) VALUES ('old', ?, '*', '[100]', 0, 0, 60, 0.05, 'succeeded', 1, 1)",
            (json.dumps(ref(2).to_dict()),),
        )
        db.execute(
            "INSERT INTO fleet_rollout_devices (rollout, device_id, position, stage, state, updated_at) "
            "VALUES ('old', 'dev-00', 0, 0, 'applied', 1)"
        )
        assert "joined" not in {row[1] for row in db.execute("PRAGMA table_info(fleet_rollout_devices)")}
    fleet_store = FleetStore(tmp_path)
    r = fleet_store.get("old")
    assert (r.state, r.min_soak_requests, r.stage_elapsed_s) == ("succeeded", 0, 0.0)
    assert [(d.device_id, d.joined) for d in fleet_store.devices("old")] == [("dev-00", False)]
    FleetStore(tmp_path)  # opening it again changes nothing


def test_devices_rolled_back_before_the_upgrade_are_not_taken_as_refusing_the_rollback(tmp_path: Path) -> None:
    import json
    import sqlite3

    from modelfleet.deployer.fleet import store as store_module

    # an earlier version kept the rollout's `$version` on a rolled-back row; this device failed
    # on that version (why it was rolled back) and has not reported on the rollback since
    backend = MemoryFleetBackend()
    backend.add("dev-00")
    version = backend.set_desired({"dev-00": ref(2)})["dev-00"]
    backend.report("dev-00", "failed", reason="boom", stage="warmup")
    old_schema = "\n".join(
        line
        for line in store_module._SCHEMA.splitlines()
        if not any(f"    {col} " in line for cols in store_module._ADDED_COLUMNS.values() for col in cols)
    )
    with sqlite3.connect(tmp_path / "registry.db") as db:
        db.executescript(old_schema)
        db.execute(
            "INSERT INTO fleet_rollouts (name, model, target, stages, max_failure, soak_s, timeout_s, max_error_rate, "
            "state, created_at, updated_at) VALUES ('old', ?, '*', '[100]', 0, 0, 60, 0.05, 'failed', 1, 1)",
            (json.dumps(ref(2).to_dict()),),
        )
        db.execute(
            "INSERT INTO fleet_rollout_devices (rollout, device_id, position, stage, state, desired_version, reason, "
            "previous, updated_at) VALUES ('old', 'dev-00', 0, 0, 'rolled_back', ?, 'warmup: boom; rolled back to "
            "digits:1', ?, 1)",
            (version, json.dumps(ref(1, SHA1).to_dict())),
        )
    engine = RolloutEngine(FleetStore(tmp_path), backend)
    assert engine.confirm_rollbacks("old") == []
    [row] = engine.status("old")["devices"]
    assert (row["reason"], row["confirmed"], row["desired_version"]) == (
        "warmup: boom; rolled back to digits:1",
        False,
        None,
    )
