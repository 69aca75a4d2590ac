"""The reconciler: brings the serving model in line with the desired state, one `$version` at a time.

download → verify → install (the store) → load beside the active version →
warm up → swap (the scoring host) → persist → report `applied`. Any failure
leaves the active version serving and is reported `failed` with its stage and
reason. Transient failures (network, server errors) are retried with capped
exponential backoff; the rest are final for that `$version`, so a device
never flaps between versions. A newer desired state abandons the one in
progress (its download stops within ~0.1 s, even on a stalled link: `download.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from modelfleet.scoring import ModelHost, ModelLoadError, ModelSpec
from modelfleet.scoring.footprint import trim_heap

from .errors import AgentError, ApplyError, Superseded
from .modelref import ModelVersionRef
from .protocol import ActiveModel, ApplyStatus, DesiredState, ReportedState
from .state import AgentState, Failure, StateFile
from .store import ModelStore

log = logging.getLogger("modelfleet.agent.reconciler")

Reporter = Callable[[ReportedState], Awaitable[None]]


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff for transient failures, with jitter so that a fleet
    whose artifact server came back does not retry in lockstep."""

    initial_s: float = 1.0
    max_s: float = 60.0
    factor: float = 2.0
    jitter: float = 0.2  # +-20 %

    def delay(self, attempt: int) -> float:
        base = min(self.max_s, self.initial_s * self.factor ** max(0, attempt - 1))
        return float(base * (1.0 + random.uniform(-self.jitter, self.jitter)))


class CommandError(AgentError):
    """A command cannot be carried out; the message says why."""


class CommandExpired(CommandError):
    """A command arrived later than `commands.max_age_s` after it was issued (e.g. queued while offline)."""


class Reconciler:
    """Owns the scoring host's active version and the persisted agent state."""

    def __init__(
        self,
        *,
        device_id: str,
        store: ModelStore,
        host: ModelHost,
        state_file: StateFile,
        report: Reporter,
        backoff: Backoff | None = None,
        agent_version: str = "",
    ) -> None:
        self.device_id = device_id
        self.store = store
        self.host = host
        self.state_file = state_file
        self.state: AgentState = state_file.load()
        self._report_cb = report
        self.backoff = backoff or Backoff()
        self.agent_version = agent_version
        self.last_report: ReportedState | None = None
        self.swap_events: list[dict[str, Any]] = []
        self._desired: DesiredState | None = None
        self._wake = asyncio.Event()
        self._cancel = threading.Event()
        self._lock = asyncio.Lock()  # one model change at a time (apply, rollback, restart)
        self._stopping = False

    # --- inputs -------------------------------------------------------------------
    def on_desired(self, desired: DesiredState) -> None:
        current = self._desired
        if current is not None and desired.version <= current.version:
            return  # a retained re-delivery after a reconnect, or a stale one: nothing new
        self._desired = desired
        self._cancel.set()  # abandon work on an older version, if any
        self._wake.set()

    async def on_bad_desired(self, reason: str, version: int | None) -> None:
        """Report an undecodable desired state; what is serving stays as it is."""
        await self._report("failed", version, stage="desired", reason=reason)

    def stop(self) -> None:
        """Abandon any download in progress (its bytes stay for a resume); called on shutdown."""
        self._stopping = True
        self._cancel.set()

    # --- start-up -----------------------------------------------------------------
    async def restore(self) -> None:
        """Serve the last good version again (after a restart), falling back to the previous one.

        Each candidate's bytes are checked again first (a power cut or a failing disk can damage
        what verified at install); a damaged one is removed, so the desired state downloads it
        anew. With state.json lost, the candidates are the installed versions, newest first.
        Whatever is served instead of state.json's active version (or nothing) makes the desired
        state count as not handled yet: the reconciler applies it again and converges.
        """
        state = self.state
        original = state.active
        if original is not None:
            candidates = [ref for ref in (state.active, state.previous) if ref is not None]
        elif self.state_file.lost is not None:
            candidates = self.store.recoverable()
            if candidates:
                log.warning("event=state_rebuilt reason=%r candidates=%s",
                            self.state_file.lost, ",".join(r.key for r in candidates))
        else:
            return  # a fresh device, or a desired state asked for no model (`previous` is for a rollback)
        for ref in candidates:
            damage = await self._damage(ref)
            if damage is not None:
                log.error("event=restore_refused model=%s reason=%r", ref.key, damage)
                self._swap_event(None, ref, ok=False, ts=time.time(), stage="restore", reason=damage)
                continue
            started = time.time()
            try:
                await self.host.aload(self._spec(ref))
            except ModelLoadError as exc:
                log.error("event=restore_failed model=%s stage=%s reason=%r", ref.key, exc.stage, exc.reason)
                self._swap_event(None, ref, ok=False, ts=started, stage=exc.stage, reason=exc.reason)
                continue
            log.info("event=restored model=%s", ref.key)
            if ref != original:
                self._restored_other(ref)
            return
        if candidates:
            log.error("event=restore_none reason=%r", "no installed version verified and loaded")
            self._restored_other(None)

    async def _damage(self, ref: ModelVersionRef) -> str | None:
        """Why `ref`'s bytes on disk must not be loaded (`ModelStore.damage`), or None. A damaged
        version is removed, so a desired state naming it downloads it anew."""
        damage = await asyncio.get_running_loop().run_in_executor(None, self.store.damage, ref)
        if damage is not None and self.store.is_installed(ref):
            self.store.remove(ref)
        return damage

    def _restored_other(self, ref: ModelVersionRef | None) -> None:
        """Persist that `ref` serves instead of what state.json said; the desired state is due again."""
        state = self.state
        state.previous = None if ref is None or ref == state.previous else state.previous
        state.active = ref
        state.applied_version = None
        state.handled_version = state.handled_sha256 = None
        state.failure = None
        self.state_file.save(state)

    # --- the loop -----------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            desired = self._desired
            if desired is None:
                continue
            if self.state.handled(desired.version, _sha_of(desired.model)):
                await self._report_handled(desired)
                continue
            await self._apply_with_retries(desired)

    async def _report_handled(self, desired: DesiredState) -> None:
        failure = self.state.failure
        if failure is not None and failure.version == desired.version:
            await self._report("failed", desired.version, stage=failure.stage, reason=failure.reason)
        else:
            await self._report("applied", desired.version)

    async def _apply_with_retries(self, desired: DesiredState) -> None:
        attempt = 0
        while self._desired is desired and not self._stopping:
            attempt += 1
            self._cancel = threading.Event()
            try:
                async with self._lock:
                    await self._apply(desired, attempt)
                return
            except Superseded as exc:
                log.info("event=superseded version=%d reason=%r", desired.version, str(exc))
                return
            except ApplyError as exc:
                if not exc.transient:
                    await self._refuse(desired, exc.stage, exc.reason)
                    return
                failure: ApplyError = exc
            except Exception as exc:
                # a bug or an unexpected OS error: keep serving, retry later rather than die
                log.exception("event=apply_crashed version=%d", desired.version)
                failure = ApplyError("agent", f"{type(exc).__name__}: {exc}", transient=True)
            if self._stopping:
                return
            delay = self.backoff.delay(attempt)
            log.warning(
                "event=apply_retry version=%d stage=%s attempt=%d delay_s=%.1f reason=%r",
                desired.version, failure.stage, attempt, delay, failure.reason,
            )
            await self._report("applying", desired.version, stage=failure.stage,
                               reason=f"{failure.reason} (retry in {delay:.1f}s)", attempt=attempt)
            with contextlib.suppress(TimeoutError):  # a newer desired state ends the wait early
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _apply(self, desired: DesiredState, attempt: int) -> None:
        ref = desired.model
        if ref is None:
            await self._unload(desired)
            return
        active = self.state.active
        if active is not None and _same_model(active, ref) and self.host.active is not None:
            self.state.active = ref  # e.g. a new artifact URL for the same bytes
            await self._finish(desired, ref, swapped=False)
            return
        await self._report("applying", desired.version, stage="download", attempt=attempt)
        loop = asyncio.get_running_loop()
        cancel = self._cancel
        await loop.run_in_executor(None, self.store.fetch, ref, cancel)
        if self._desired is not desired:
            raise Superseded(f"$version {desired.version} superseded after download")
        await self._report("applying", desired.version, stage="load", attempt=attempt)
        await self._load(ref)
        await self._finish(desired, ref, swapped=True)

    async def _unload(self, desired: DesiredState) -> None:
        """Serve no model (a desired state with `model: null`); what served becomes `previous`."""
        before = self.host.active
        if before is not None or self.state.active is not None:
            started = time.time()
            self.host.unload()  # readiness turns false; requests in flight finish on the old version
            self._swap_event(before, None, ok=True, ts=started)
        await self._finish(desired, None, swapped=self.state.active is not None)

    async def _load(self, ref: ModelVersionRef) -> None:
        before = self.host.active
        started = time.time()
        try:
            await self.host.aload(self._spec(ref))
        except ModelLoadError as exc:
            self._swap_event(before, ref, ok=False, stage=exc.stage, reason=exc.reason, ts=started)
            raise ApplyError(exc.stage, exc.reason) from None
        self._swap_event(before, ref, ok=True, ts=started)

    async def _finish(self, desired: DesiredState, ref: ModelVersionRef | None, *, swapped: bool) -> None:
        if swapped and self.state.active != ref:
            self.state.previous = self.state.active
            self.state.active = ref
        self.state.applied_version = desired.version
        self.state.mark_handled(desired.version, _sha_of(ref))
        self.state.failure = None
        self.state_file.save(self.state)
        self._prune()
        if swapped:
            trim_heap()  # the old version and the download buffers are freed by now
        log.info("event=applied version=%d model=%s", desired.version, ref.key if ref else "none")
        await self._report("applied", desired.version)

    async def _refuse(self, desired: DesiredState, stage: str, reason: str) -> None:
        log.warning("event=apply_failed version=%d stage=%s reason=%r", desired.version, stage, reason)
        self.state.mark_handled(desired.version, _sha_of(desired.model))
        self.state.failure = Failure(desired.version, stage, reason)
        self.state_file.save(self.state)
        self._prune()
        await self._report("failed", desired.version, stage=stage, reason=reason)

    def _prune(self) -> None:
        keep = {r.sha256 for r in (self.state.active, self.state.previous) if r is not None}
        if self._desired is not None and self._desired.model is not None:
            keep.add(self._desired.model.sha256)  # its partial download, for a resume
        self.store.prune(keep)

    # --- commands -----------------------------------------------------------------
    async def rollback(self) -> ReportedState:
        """Swap back to the previous version; the current desired `$version` is not re-applied."""
        async with self._lock:
            previous, current = self.state.previous, self.state.active
            if previous is None:
                raise CommandError("no previous version is kept on this device")
            if not self.store.is_installed(previous):
                raise CommandError(f"previous version {previous.key} is no longer on disk")
            damage = await self._damage(previous)
            if damage is not None:
                raise CommandError(f"rollback to {previous.key} refused: {damage} (removed from disk)")
            try:
                await self._load(previous)
            except ApplyError as exc:
                raise CommandError(f"rollback to {previous.key} failed at {exc.stage}: {exc.reason}") from None
            self.state.active, self.state.previous = previous, current
            desired = self._desired
            version = desired.version if desired else self.state.handled_version
            reason = f"rolled back from {current.key if current else 'nothing'} to {previous.key} by command"
            if version is not None:
                self.state.mark_handled(version, _sha_of(desired.model) if desired else self.state.handled_sha256)
                self.state.failure = Failure(version, "rollback", reason)
            self.state_file.save(self.state)
            return await self._report("failed", version, stage="rollback", reason=reason)

    async def restart_model(self) -> ReportedState:
        """Load the active version again from disk (load, warm up, swap)."""
        async with self._lock:
            active = self.state.active
            if active is None:
                raise CommandError("no model version is active")
            # not removed: the copy in memory keeps serving, and a restart then falls back to previous
            damage = await asyncio.get_running_loop().run_in_executor(None, self.store.damage, active)
            if damage is not None:
                raise CommandError(f"restart of {active.key} refused: {damage}")
            try:
                await self._load(active)
            except ApplyError as exc:
                raise CommandError(f"restart of {active.key} failed at {exc.stage}: {exc.reason}") from None
            return await self.republish()

    async def republish(self) -> ReportedState:
        """Report the current state again (e.g. after a reconnect or a restart-model)."""
        last = self.last_report
        if last is None:
            # nothing reported since start: what state.json says (a fresh device: nothing desired, nothing to do)
            failure = self.state.failure
            if failure is not None and failure.version == self.state.handled_version:
                return await self._report("failed", failure.version, stage=failure.stage, reason=failure.reason)
            return await self._report("applied", self.state.handled_version)
        return await self._report(last.status, last.version, stage=last.stage, reason=last.reason,
                                  attempt=last.attempt)

    # --- helpers ------------------------------------------------------------------
    def _spec(self, ref: ModelVersionRef) -> ModelSpec:
        model_dir = self.store.model_dir(ref)
        return ModelSpec(
            model_dir=model_dir,
            # inside the verified folder only: a relative name would also be looked up in the working directory
            entry_script=model_dir / ref.entry_script if ref.entry_script else None,
            name=ref.name,
            version=str(ref.version),
        )

    def _swap_event(
        self, before: Any, ref: ModelVersionRef | None, *, ok: bool, ts: float,
        stage: str | None = None, reason: str | None = None,
    ) -> None:
        event: dict[str, Any] = {
            "ts": ts,
            "from": f"{before.name}:{before.version}" if before is not None else None,
            "to": ref.key if ref is not None else None,
            "ok": ok,
        }
        if stage is not None:
            event["stage"], event["reason"] = stage, reason
        if len(self.swap_events) < 1000:  # bounded even if telemetry never drains
            self.swap_events.append(event)

    def drain_swap_events(self) -> list[dict[str, Any]]:
        events, self.swap_events = self.swap_events, []
        return events

    async def _report(
        self, status: ApplyStatus, version: int | None, *, stage: str | None = None,
        reason: str | None = None, attempt: int = 0,
    ) -> ReportedState:
        state = ReportedState(
            device_id=self.device_id,
            version=version,
            status=status,
            active=ActiveModel.of(self.state.active) if self.state.active else None,
            previous=ActiveModel.of(self.state.previous) if self.state.previous else None,
            applied_version=self.state.applied_version,
            stage=stage,
            reason=reason,
            attempt=attempt,
            updated_at=time.time(),
            agent_version=self.agent_version,
        )
        self.last_report = state
        await self._report_cb(state)
        return state


def _sha_of(ref: ModelVersionRef | None) -> str | None:
    return ref.sha256 if ref is not None else None


def _same_model(a: ModelVersionRef, b: ModelVersionRef) -> bool:
    """The same bytes served the same way (the URL and signature may differ)."""
    return (a.sha256, a.name, a.version, a.format, a.filename, a.entry_script) == (
        b.sha256, b.name, b.version, b.format, b.filename, b.entry_script,
    )
