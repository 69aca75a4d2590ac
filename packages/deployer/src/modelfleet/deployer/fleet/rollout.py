"""The rollout engine: staged, health-gated model rollouts over any `FleetBackend`.

A rollout is a persisted state machine advanced by `step()`; `drive()` loops it.
Each stage covers a cumulative percentage of the target devices, in an order
fixed at creation: devices sorted by sha256(rollout name + NUL + device id), so
the canary set is stable across runs yet differs between rollouts. A stage:

1. issues the new desired state to its devices (remembering what each had);
2. waits until each reports `applied` or `failed` for that desired `$version`
   (offline devices stay pending; at `timeout` the still pending count as failed);
3. halts when failed/stage size exceeds `max_failure`;
4. soaks: for `soak_s` (watched time, like the timeout), the stage's telemetry must
   keep the error rate and p99 latency within limits, and add up to `min_soak_requests`;
5. passes; the last stage passing makes the rollout `succeeded`.

A failed stage rolls its devices back to their previous desired state and
leaves the rollout `failed` with the reason. The target is evaluated again when
a stage starts and before the rollout succeeds: devices that newly match join
the current stage. Nothing here imports paho.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from modelfleet.agent.modelref import ModelVersionRef
from modelfleet.deployer.fleet.backends.base import DeviceInfo, FleetBackend, TelemetrySummary
from modelfleet.deployer.fleet.query import parse_query
from modelfleet.deployer.fleet.store import (
    ACTIVE_STATES,
    FleetError,
    FleetStore,
    Rollout,
    RolloutConflictError,
    RolloutDevice,
)

log = logging.getLogger("modelfleet.fleet")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ---------------------------------------------------------------- option parsing


def parse_duration(text: str, what: str) -> float:
    """'500ms', '30s', '2m', '1h' or bare seconds -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise FleetError(f"{what}: {text!r} is not a duration", hint="write e.g. 30s, 2m, 1h or 500ms")
    value = float(m.group(1))
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]


def parse_ratio(text: str, what: str) -> float:
    """'5%' or '0.05' -> 0.05."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise FleetError(f"{what}: {text!r} is not a percentage", hint="write e.g. 5% or 0.05") from None
    if not 0.0 <= value <= 1.0:
        raise FleetError(f"{what}: {text!r} must be between 0% and 100%", hint="write e.g. 5% or 0.05 (a bare number is a fraction)")
    return value


def parse_stages(text: str) -> list[int]:
    """'1,10,50,100' -> [1, 10, 50, 100]: strictly increasing cumulative percentages ending at 100."""
    stages: list[int] = []
    for part in text.split(","):
        try:
            pct = int(part.strip().rstrip("%"))
        except ValueError:
            raise FleetError(f"--stages: {part.strip()!r} is not a whole percentage", hint="e.g. --stages 1,10,50,100") from None
        if not 1 <= pct <= 100:
            raise FleetError(f"--stages: {pct} is outside 1..100")
        if stages and pct <= stages[-1]:
            raise FleetError(f"--stages: {pct} does not increase on {stages[-1]} (stages are cumulative)")
        stages.append(pct)
    if stages[-1] != 100:
        raise FleetError(f"--stages: the last stage must be 100, not {stages[-1]}", hint="e.g. --stages 10,100")
    return stages


def check_request_count(value: int, what: str) -> int:
    if value < 0:
        raise FleetError(f"{what}: {value} is not a request count", hint="0 (the default) lets a soak without traffic pass")
    return value


def rollout_order(name: str, device_ids: list[str]) -> list[str]:
    """The deterministic device order of a rollout."""
    return sorted(device_ids, key=lambda d: (hashlib.sha256(f"{name}\0{d}".encode()).digest(), d))


def stage_sizes(total: int, stages: list[int]) -> list[int]:
    """Cumulative device counts per stage; every stage with a devices left gets at least one."""
    sizes: list[int] = []
    for pct in stages:
        n = min(total, math.ceil(total * pct / 100))
        if total and sizes:
            n = max(n, min(total, sizes[-1] + 1))
        elif total:
            n = max(n, 1)
        sizes.append(n)
    return sizes


@dataclass
class _StageCache:
    stage: int
    cursor: int
    pending: dict[str, int]  # device -> the desired `$version` it was sent
    timed_out: dict[str, tuple[int | None, str | None]]  # device -> ($version, reason) of its timeout


@dataclass(frozen=True)
class RolloutSpec:
    name: str
    model: ModelVersionRef
    target: str = "*"
    stages: tuple[int, ...] = (100,)
    max_failure: float = 0.0
    soak_s: float = 0.0
    timeout_s: float = 600.0
    max_error_rate: float = 0.05
    max_p99_ms: float | None = None
    min_soak_requests: int = 0
    backend: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # refused here, before anything is stored or published: a zero timeout fails every
        # device at once, a p99 limit of zero or less fails every stage that sees traffic
        if not _NAME.match(self.name):
            raise FleetError(f"rollout name {self.name!r} is invalid: use letters, digits, '.', '_' or '-' (max 128)")
        if not self.timeout_s > 0:
            raise FleetError(f"--timeout: {self.timeout_s:g}s leaves devices no time to report", hint="e.g. --timeout 10m")
        check_request_count(self.min_soak_requests, "--min-soak-requests")
        if self.max_p99_ms is not None and not self.max_p99_ms > 0:
            raise FleetError(f"--max-p99-ms: {self.max_p99_ms:g} is not a latency limit", hint="e.g. --max-p99-ms 50")


# ---------------------------------------------------------------- the engine


class RolloutEngine:
    """Creates and advances rollouts; state in `FleetStore`, devices through a `FleetBackend`."""

    def __init__(
        self,
        store: FleetStore,
        backend: FleetBackend,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.backend = backend
        self.clock = clock
        self._cache: dict[str, _StageCache] = {}
        self._ticks: dict[str, float] = {}  # rollout -> the clock at this engine's previous step

    # -------------------------------------------------------------- create

    def create(self, spec: RolloutSpec) -> Rollout:
        query = parse_query(spec.target)
        matched = [d.device_id for d in merged_devices(self.store, self.backend) if query.matches(d.document())]
        if not matched:
            raise FleetError(
                f"target {spec.target!r} matches no known device",
                hint="see the fleet with `modelfleet fleet devices` (devices are known once they connected)",
            )
        order = rollout_order(spec.name, matched)
        sizes = stage_sizes(len(order), list(spec.stages))
        stage_of = [next(i for i, size in enumerate(sizes) if pos < size) for pos in range(len(order))]
        rollout = Rollout(
            name=spec.name,
            model=spec.model,
            target=query.text,
            stages=list(spec.stages),
            max_failure=spec.max_failure,
            soak_s=spec.soak_s,
            timeout_s=spec.timeout_s,
            max_error_rate=spec.max_error_rate,
            max_p99_ms=spec.max_p99_ms,
            min_soak_requests=spec.min_soak_requests,
            backend=spec.backend or {},
        )
        self.store.create(rollout, order, stage_of)
        log.info("rollout created name=%s model=%s devices=%d stages=%s", spec.name, spec.model.key, len(order), sizes)
        return self.store.get(spec.name)

    # -------------------------------------------------------------- operator actions

    def pause(self, name: str) -> Rollout:
        if not self.store.set_state(name, "paused", only_from=("running",)):
            r = self.store.get(name)
            raise FleetError(f"rollout {name!r} is {r.state}; only a running rollout can be paused")
        return self.store.get(name)

    def resume(self, name: str) -> Rollout:
        r = self.store.get(name)
        if r.state not in ACTIVE_STATES:
            raise FleetError(f"rollout {name!r} is {r.state}; only a paused or running rollout can be resumed")
        self.store.set_state(name, "running", only_from=ACTIVE_STATES)
        return self.store.get(name)

    def abort(self, name: str) -> Rollout:
        """Stop where it stands; devices keep what they have."""
        r = self.store.get(name)
        if r.state not in ACTIVE_STATES:
            raise FleetError(f"rollout {name!r} is already {r.state}")
        r.state = "aborted"
        r.reason = "aborted by the operator"
        self.store.save(r, force=True)
        return r

    def rollback(self, name: str) -> Rollout:
        """Put every device this rollout touched back on its previous desired state."""
        r = self.store.get(name)
        if r.state == "rolled_back":
            raise FleetError(f"rollout {name!r} is already rolled back")
        if not r.active and (clash := self.store.clash(name)):
            # putting those devices back would pull them out from under the other rollout
            raise RolloutConflictError(
                f"rollout {name!r} cannot be rolled back while {clash}",
                hint="wait for that rollout to finish, or abort it first",
            )
        was = r.state
        if was in ACTIVE_STATES:
            # stop a live controller (it re-reads the state before each step) ...
            self.store.set_state(name, "rolled_back")
        try:
            # ... and wait for it to let go, so no device it is issuing to escapes the rollback
            with self.lease(name, wait_s=30):
                touched = [d for d in self.store.devices(name) if d.state not in ("waiting", "rolled_back")]
                self._roll_back(touched)
        except BaseException:
            # nothing was put back (the controller held on, or the broker failed): the rollout
            # must not look rolled back, or a second `rollback` would be refused
            if was in ACTIVE_STATES:
                self.store.set_state(name, was, only_from=("rolled_back",))
            raise
        r.reason = "rolled back by the operator" + (f" (was: {r.reason})" if r.reason else "")
        r.state = "rolled_back"
        self.store.save(r, force=True)
        return r

    # -------------------------------------------------------------- driving

    @contextlib.contextmanager
    def lease(self, name: str, *, wait_s: float = 0.0) -> Iterator[None]:
        """Only one controller drives a rollout: an exclusive lock the kernel drops when it dies.

        With `wait_s`, wait that long for the holder to let go before giving up."""
        lock_dir = self.store.home / "fleet" / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        path = lock_dir / f"{name}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = Path(path).read_text().strip() or "?"
                        raise FleetError(
                            f"rollout {name!r} is already driven by another process (pid {holder})",
                            hint="watch it with `modelfleet fleet rollout status`",
                        ) from None
                    time.sleep(0.05)
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            yield
        finally:
            os.close(fd)

    def drive(
        self,
        name: str,
        *,
        poll: float = 0.25,
        batch: float = 0.02,
        on_step: Callable[[Rollout], None] | None = None,
        deadline: float | None = None,
    ) -> Rollout:
        """Advance the rollout until it finishes, is paused or aborted (or `deadline`, monotonic)."""
        with self.lease(name):
            while True:
                r = self.step(name)
                if on_step:
                    on_step(r)
                if r.state != "running":
                    return r
                if deadline is not None and time.monotonic() > deadline:
                    return r
                self.backend.wait(poll)
                # let a burst of reports accumulate: fewer, larger steps leave the CPU to
                # the broker and the devices (thousands of reports arrive within a second)
                time.sleep(batch)

    def step(self, name: str) -> Rollout:
        """One reconcile pass; idempotent, safe to call after a crash at any point."""
        r = self.store.get(name)
        if r.state != "running":
            self._cache.pop(name, None)
            self._ticks.pop(name, None)
            return r
        now = self.clock()
        # the stage's clocks advance only while a controller watches: the time since this
        # engine's previous step. A paused rollout or a dead controller adds nothing, and a
        # resumed one (a fresh engine, or a step after a pause) starts counting again from here
        last = self._ticks.get(name)
        self._ticks[name] = now
        delta = max(0.0, now - last) if last is not None else 0.0
        if r.stage_started_at is None:
            self._take_joiners(r)
            r.stage_started_at = now
            r.stage_elapsed_s = r.soak_elapsed_s = 0.0
            self.store.save(r)
        elif delta:
            r.stage_elapsed_s += delta
            if r.phase == "soaking":
                r.soak_elapsed_s += delta
            self.store.save(r)
        # the stage's pending devices are cached while this engine drives it, and only the
        # devices the backend saw change are looked at: a step costs O(changes), not O(fleet)
        cache = self._cache.get(name)
        to_issue: list[tuple[str, str]] = []
        if cache is None or cache.stage != r.stage:
            cursor, _ = self.backend.changed(None)
            moving = self.store.moving(name, r.stage)
            cache = _StageCache(
                r.stage,
                cursor,
                {d: v for d, st, v in moving if st == "pending" and v is not None},
                self.store.timed_out(name),
            )
            self._cache[name] = cache
            to_issue = [(d, st) for d, st, _ in moving if st in ("waiting", "issuing")]
            candidates = list(cache.pending)
            late_candidates = list(cache.timed_out)
        else:
            cache.cursor, dirty = self.backend.changed(cache.cursor)
            candidates = [d for d in dict.fromkeys(dirty) if d in cache.pending]
            late_candidates = [d for d in dict.fromkeys(dirty) if d in cache.timed_out]

        # 1. issue desired states (the rows are written first: a crash re-issues, never loses one)
        if to_issue:
            issued = self._issue(r, to_issue)
            cache.pending.update(issued)
            candidates.extend(issued)

        # 2. collect outcomes
        changes: list[tuple[str, str, int | None, str | None]] = []
        for dev in candidates:
            version = cache.pending.get(dev)
            if version is None:
                continue
            info = self.backend.device(dev)
            outcome = info.outcome(version) if info else "pending"
            if outcome == "applied":
                changes.append((dev, "applied", version, None))
                del cache.pending[dev]
            elif outcome == "failed":
                assert info is not None
                where = f"{info.stage}: " if info.stage else ""
                changes.append((dev, "failed", version, f"{where}{info.reason or 'failed'}"))
                del cache.pending[dev]
        if r.stage_elapsed_s >= r.timeout_s:
            for dev, version in cache.pending.items():
                info = self.backend.device(dev)
                reason = (
                    f"offline, no report within {r.timeout_s:g}s"
                    if info is None or not info.online
                    else f"did not apply within {r.timeout_s:g}s"
                )
                changes.append((dev, "timeout", version, reason))
                cache.timed_out[dev] = (version, reason)
            cache.pending.clear()
        # a device counted as timed out (this stage or an earlier one) that applied since
        changes.extend(self._late(r, {d: cache.timed_out[d] for d in late_candidates if d in cache.timed_out}))
        for dev, state, _, _ in changes:
            if state == "late":
                cache.timed_out.pop(dev, None)
        self.store.set_states(name, changes)

        # 3. failure budget
        counts = self.store.stage_counts(name, r.stage)
        total = sum(counts.values())
        n_failed = counts.get("failed", 0) + counts.get("timeout", 0)
        if total and n_failed / total > r.max_failure:
            first = self.store.first_device(name, r.stage, ("failed", "timeout"))
            assert first is not None
            reason = (
                f"stage {r.stage + 1}: {n_failed} of {total} devices failed "
                f"(max {r.max_failure:.0%}); {first.device_id}: {first.reason}"
            )
            return self._fail(r, reason)
        if any(counts.get(s) for s in ("pending", "waiting", "issuing")):
            return r

        # 4. soak with the telemetry gate
        if r.phase == "deploying":
            r.phase = "soaking"
            r.soak_started_at = now
            r.soak_elapsed_s = 0.0
            self.store.save(r)
        assert r.soak_started_at is not None
        n_applied = counts.get("applied", 0)
        health = TelemetrySummary()
        if (n_applied or counts.get("late")) and (r.soak_s > 0 or r.min_soak_requests):
            applied = self.store.device_ids(name, r.stage, ("applied", "late"))
            health = self.backend.telemetry(
                applied, since=r.soak_started_at, model=(r.model.name, r.model.version)
            )
            if health.requests and health.error_rate > r.max_error_rate:
                reason = (
                    f"stage {r.stage + 1}: telemetry gate: error rate {health.error_rate:.1%} "
                    f"({health.errors}/{health.requests} requests) above {r.max_error_rate:.1%}"
                )
                return self._fail(r, reason)
            if r.max_p99_ms is not None and health.p99_ms is not None and health.p99_ms > r.max_p99_ms:
                reason = (
                    f"stage {r.stage + 1}: telemetry gate: p99 latency {health.p99_ms:.1f} ms "
                    f"above {r.max_p99_ms:g} ms"
                )
                return self._fail(r, reason)
        if r.soak_elapsed_s < r.soak_s:
            return r
        if health.requests < r.min_soak_requests:
            # a soak nobody sent traffic to proves nothing: wait for more, up to the stage timeout
            if r.stage_elapsed_s < r.timeout_s:
                return r
            reason = (
                f"stage {r.stage + 1}: its devices served {health.requests} requests during the soak, "
                f"fewer than --min-soak-requests {r.min_soak_requests}, within {r.timeout_s:g}s"
            )
            return self._fail(r, reason)

        # 5. stage passed
        if r.stage + 1 >= len(r.stages) and self._take_joiners(r):
            # devices matched the target since the last stage started: the stage takes them in and
            # runs again (issue, wait with a fresh timeout, soak) before the rollout can succeed
            r.phase = "deploying"
            r.stage_started_at = None
            r.soak_started_at = None
            self._cache.pop(name, None)
            self.store.save(r)
            return r
        r.stage_log.append(
            {
                "stage": r.stage + 1,
                "percent": r.stages[r.stage],
                "devices": total,
                "applied": n_applied,
                "failed": n_failed,
                "seconds": round(now - r.stage_started_at, 3),
                "watched_s": round(r.stage_elapsed_s, 3),
                "result": "passed",
            }
        )
        if r.soak_s > 0:
            r.stage_log[-1]["soak_requests"] = health.requests
            if not health.requests:
                r.stage_log[-1]["warning"] = "soak saw no traffic"
        log.info("rollout stage passed name=%s stage=%d devices=%d", name, r.stage + 1, total)
        if r.stage + 1 >= len(r.stages):
            r.state = "succeeded"
            r.reason = None
        else:
            r.stage += 1
            r.phase = "deploying"
            r.stage_started_at = None
            r.soak_started_at = None
        self.store.save(r)
        return r

    # -------------------------------------------------------------- helpers

    def _issue(self, r: Rollout, devices: list[tuple[str, str]]) -> dict[str, int]:
        """Publish the rollout's desired state to (device, state) rows; the `$version` per device."""
        # remember each device's previous desired state before publishing ours, so a
        # crash between the two re-publishes ('issuing') without mistaking ours for theirs
        fresh = {}
        for dev, state in devices:
            if state == "waiting":
                info = self.backend.device(dev)
                fresh[dev] = info.desired if info else None
        if fresh:
            self.store.mark_issuing(r.name, fresh)
        versions = self.backend.set_desired({dev: r.model for dev, _ in devices})
        self.store.set_states(r.name, [(dev, "pending", versions[dev], None) for dev, _ in devices])
        return versions

    def _take_joiners(self, r: Rollout) -> list[str]:
        """Append the devices that match the target now but are not in the rollout yet to its
        current stage (in the rollout's order among themselves); those another rollout holds stay out."""
        query = parse_query(r.target)
        known = self.store.member_ids(r.name)
        fresh = [
            d.device_id
            for d in merged_devices(self.store, self.backend)
            if d.device_id not in known and query.matches(d.document())
        ]
        added = self.store.add_devices(r.name, rollout_order(r.name, fresh), r.stage)
        if added:
            log.info("rollout devices joined name=%s stage=%d devices=%d", r.name, r.stage + 1, len(added))
        return added

    def _late(
        self, r: Rollout, timed_out: Mapping[str, tuple[int | None, str | None]]
    ) -> list[tuple[str, str, int | None, str | None]]:
        """State changes for timed-out devices that now serve the rollout's version: `late`.

        The verdict of their stage is not revisited; this only tells the operator they converged."""
        changes: list[tuple[str, str, int | None, str | None]] = []
        for dev, (version, reason) in timed_out.items():
            info = self.backend.device(dev)
            if version is None or info is None or info.outcome(version) != "applied" or info.active != r.model.key:
                continue
            changes.append((dev, "late", version, f"applied after its stage timed out ({reason or 'timeout'})"))
        return changes

    def converged_late(self, name: str) -> list[str]:
        """Mark the rollout's timed-out devices that have applied its version since as `late`.

        `rollout status` calls this beside a live controller, which may roll a timed-out device
        back meanwhile: only a device still `timeout` when written turns `late`."""
        r = self.store.get(name)
        return self.store.change_states(name, "timeout", self._late(r, self.store.timed_out(name)))

    def confirm_rollbacks(self, name: str) -> list[str]:
        """Note on the rollout's rolled-back devices whether they reported on the rollback:
        applied and serving what they had before (no model, for one that had none), or refused."""
        confirmed = []
        for d in self.store.devices(name, states=("rolled_back",)):
            info = self.backend.device(d.device_id)
            if d.confirmed or d.desired_version is None or info is None:
                continue
            want = d.previous.key if d.previous else None
            outcome = info.outcome(d.desired_version)
            if outcome == "applied" and info.active == want:
                note = f"it serves {want} again" if want else "it serves no model now"
            elif outcome == "failed":
                note = f"the device refused the rollback: {info.stage + ': ' if info.stage else ''}{info.reason or 'failed'}"
            else:
                continue  # not there yet (offline, still applying), or moved on since
            d.reason = (d.reason + "; " if d.reason else "") + note
            d.confirmed = True
            confirmed.append(d)
        self.store.update_devices(confirmed)
        return [d.device_id for d in confirmed]

    def _roll_back(self, devices: list[RolloutDevice]) -> None:
        if not devices:
            return
        # a device that had no model before gets "serve no model" (twin protocol): it unloads
        # the rollout's version and reports applied with nothing active
        versions = self.backend.set_desired({d.device_id: d.previous for d in devices})
        for d in devices:
            d.reason = (d.reason + "; " if d.reason else "") + (
                f"rolled back to {d.previous.key}"
                if d.previous
                else "rolled back to no model (it had none before): the device unloads the rollout's version"
            )
            d.state = "rolled_back"
            # the rollback's `$version`: the device's report on it confirms the rollback
            d.desired_version = versions.get(d.device_id, d.desired_version)
            d.confirmed = False
        self.store.update_devices(devices)

    def _fail(self, r: Rollout, reason: str) -> Rollout:
        log.warning("rollout stage failed name=%s reason=%s", r.name, reason)
        devices = self.store.devices(r.name, stage=r.stage)
        self._roll_back([d for d in devices if d.state != "waiting"])
        r.stage_log.append(
            {
                "stage": r.stage + 1,
                "percent": r.stages[r.stage],
                "devices": len(devices),
                "seconds": round(self.clock() - (r.stage_started_at or self.clock()), 3),
                "watched_s": round(r.stage_elapsed_s, 3),
                "result": "failed",
                "reason": reason,
            }
        )
        r.state = "failed"
        r.reason = reason + " — its devices were rolled back"
        self.store.save(r)
        return r

    # -------------------------------------------------------------- views

    def status(self, name: str) -> dict[str, Any]:
        """A JSON-ready view: rollout settings, per-stage progress, per-device state."""
        r = self.store.get(name)
        devices = self.store.devices(name)
        stages = []
        cumulative = 0
        for i, pct in enumerate(r.stages):
            members = [d for d in devices if d.stage == i]
            cumulative += len(members)
            counts: dict[str, int] = {}
            for d in members:
                counts[d.state] = counts.get(d.state, 0) + 1
            stages.append({"stage": i + 1, "percent": pct, "cumulative_devices": cumulative, "devices": len(members), "states": counts})
        return {
            "name": r.name,
            "model": r.model.key,
            "target": r.target,
            "state": r.state,
            "stage": r.stage + 1,
            "phase": r.phase,
            "reason": r.reason,
            "max_failure": r.max_failure,
            "soak_s": r.soak_s,
            "timeout_s": r.timeout_s,
            # the current stage's clocks: seconds a controller watched it (pauses not counted)
            "stage_elapsed_s": round(r.stage_elapsed_s, 3),
            "soak_elapsed_s": round(r.soak_elapsed_s, 3),
            "max_error_rate": r.max_error_rate,
            "max_p99_ms": r.max_p99_ms,
            "min_soak_requests": r.min_soak_requests,
            "warnings": [f"stage {e['stage']}: {e['warning']}" for e in r.stage_log if e.get("warning")],
            "created_at": r.created_at,
            "updated_at": r.updated_at,
            "joined": sum(1 for d in devices if d.joined),
            "stages": stages,
            "stage_log": r.stage_log,
            "devices": [
                {
                    "device_id": d.device_id,
                    "stage": d.stage + 1,
                    "state": d.state,
                    "previous": d.previous.key if d.previous else None,
                    "reason": d.reason,
                    # the `$version` this rollout last sent it (for a rolled-back device, the rollback's)
                    "desired_version": d.desired_version,
                    "joined": d.joined,
                    "confirmed": d.confirmed,
                }
                for d in devices
            ],
        }


def with_central_tags(info: DeviceInfo, central: Mapping[str, Mapping[str, str]]) -> DeviceInfo:
    """The device with the tags set by `fleet tag` laid over the ones it declared."""
    extra = central.get(info.device_id)
    return replace(info, tags={**info.tags, **extra}) if extra else info


def merged_devices(store: FleetStore, backend: FleetBackend) -> list[DeviceInfo]:
    """Every device with its central tags laid over the ones it reported."""
    central = store.tags()
    return [with_central_tags(d, central) for d in backend.devices()]
