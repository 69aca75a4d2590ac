"""`Agent`: wires the transport, reconciler, model store, scoring host and telemetry into one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from importlib import metadata
from typing import Any

from modelfleet.scoring import ModelHost, ScoringServer, ServerSettings

from .config import AgentConfig
from .errors import AgentError, ConfigError
from .protocol import CommandRequest, CommandResponse, DesiredState, ReportedState, TelemetryBatch
from .reconciler import Backoff, CommandError, CommandExpired, Reconciler
from .state import StateFile
from .store import ModelStore, TrustedKeys
from .telemetry import TelemetryCollector, TelemetryQueue
from .transports.base import TwinTransport

log = logging.getLogger("modelfleet.agent")
#: how many command ids the agent remembers to recognise a second delivery of the same command
COMMANDS_REMEMBERED = 256


def agent_version() -> str:
    try:
        return metadata.version("modelfleet-agent")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def make_transport(config: AgentConfig, version: str) -> TwinTransport:
    from .transports.mqtt import MqttSettings, MqttTransport

    return MqttTransport(
        MqttSettings(
            device_id=config.device_id,
            host=config.broker_host,
            port=config.broker_port,
            username=config.username,
            password=config.password(),
            prefix=config.broker_prefix,
            keepalive_s=config.broker_keepalive_s,
            tls=config.broker_tls,
            ca_file=config.broker_ca_file,
            agent_version=version,
            tags=dict(config.device_tags) or None,
        )
    )


class Agent:
    """One device agent. `await run(stop)` serves until `stop` is set, then shuts down cleanly."""

    def __init__(self, config: AgentConfig, transport: TwinTransport | None = None) -> None:
        self.config = config
        self.version = agent_version()
        self.transport = transport or make_transport(config, self.version)
        root = config.store_dir
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / ".writable"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError("store.dir", f"{root} is not a writable folder: {exc.strerror or exc}") from None
        self.store = ModelStore(
            root / "models",
            reserve_bytes=config.store_reserve_mb * 1024 * 1024,
            trusted_keys=TrustedKeys.load(config.store_trusted_keys) if config.store_trusted_keys else None,
            token=config.token(),
            rate_limit_bps=config.store_download_limit_bps,
            timeout_s=config.store_timeout_s,
            allow_file_urls=config.store_allow_file_urls,
        )
        self.host = ModelHost()
        self.server = ScoringServer(
            self.host,
            ServerSettings(
                host=config.scoring_host,
                port=config.scoring_port,
                keys_file=config.scoring_keys_file,
                model_name="model",
            ),
        )
        self.reconciler = Reconciler(
            device_id=config.device_id,
            store=self.store,
            host=self.host,
            state_file=StateFile(root / "state.json"),
            report=self._send_report,
            backoff=Backoff(config.reconcile_retry_initial_s, config.reconcile_retry_max_s),
            agent_version=self.version,
        )
        self.queue = TelemetryQueue(
            root / "telemetry",
            max_bytes=config.telemetry_queue_max_bytes,
            max_records=config.telemetry_queue_max_records,
        )
        self.collector = TelemetryCollector(config.device_id, self._metrics, self.reconciler.drain_swap_events)
        self._drain_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        #: the last command ids seen, with their answer once there is one: QoS 1 delivers at least
        #: once (the persistent session re-sends a command whose PUBACK was lost), and a second
        #: `rollback` would swap back what the first one did
        self._commands_seen: OrderedDict[str, CommandResponse | None] = OrderedDict()

    # --- TwinHandler ----------------------------------------------------------------
    def on_desired(self, state: DesiredState) -> None:
        self.reconciler.on_desired(state)

    def on_bad_desired(self, reason: str, version: int | None) -> None:
        self._spawn(self.reconciler.on_bad_desired(reason, version))

    def on_command(self, request: CommandRequest) -> None:
        if request.id and request.id in self._commands_seen:
            answer = self._commands_seen[request.id]
            log.info("event=command_duplicate name=%s id=%s answered=%s", request.name, request.id,
                     answer is not None)
            if answer is not None:  # else the first delivery, still running, answers
                self._spawn(self.transport.respond(answer))
            return
        if request.id:
            self._commands_seen[request.id] = None
            while len(self._commands_seen) > COMMANDS_REMEMBERED:
                self._commands_seen.popitem(last=False)
        self._spawn(self._command(request))

    def on_connection(self, connected: bool) -> None:
        log.info("event=link connected=%s", connected)
        if connected:
            self._drain_wake.set()

    # --- lifecycle --------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self.reconciler.restore()
        try:
            await self.server.start()
        except OSError as exc:
            raise ConfigError(
                "scoring.port",
                f"cannot listen on {self.config.scoring_host}:{self.config.scoring_port}: {exc.strerror or exc}",
            ) from None
        log.info("event=agent_started device=%s scoring_port=%d version=%s",
                 self.config.device_id, self.server.port, self.version)
        await self.transport.start(self)
        self._tasks = [
            asyncio.create_task(self.reconciler.run(), name="reconciler"),
            asyncio.create_task(self._telemetry_loop(), name="telemetry"),
            asyncio.create_task(self._drain_loop(), name="telemetry-drain"),
        ]
        try:
            await stop.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        self.reconciler.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        await self.transport.stop()
        await self.server.stop()
        self.host.unload()
        log.info("event=agent_stopped device=%s", self.config.device_id)

    def _metrics(self) -> dict[str, Any]:
        snap = self.host.metrics.snapshot()
        if self.host.active is None:
            # the host's metrics keep the last version's name after an unload (`model: null`)
            snap["model_name"] = snap["model_version"] = ""
        return snap

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        # keep a reference until done: asyncio holds tasks only weakly
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _send_report(self, state: ReportedState) -> None:
        await self.transport.report(state)

    # --- commands -----------------------------------------------------------------------
    async def _command(self, request: CommandRequest) -> None:
        max_age = self.config.commands_max_age_s
        age = request.age()
        try:
            if max_age and age is not None and age > max_age:
                # queued at the broker while the device was offline: the sender gave up on it long ago
                raise CommandExpired(
                    f"expired: {request.name} was issued {age:.0f} s ago, longer than this device's "
                    f"commands.max_age_s of {max_age:g} s; not carried out"
                )
            if request.name == "get-state":
                report = self.reconciler.last_report or await self.reconciler.republish()
                result = {**report.to_dict(), "store": self.store.installed()}
            elif request.name == "rollback":
                result = (await self.reconciler.rollback()).to_dict()
            elif request.name == "restart-model":
                result = (await self.reconciler.restart_model()).to_dict()
            else:
                raise CommandError(
                    f"unknown command {request.name!r} (known: get-state, rollback, restart-model)"
                )
            response = CommandResponse(request.id, True, result=result)
        except AgentError as exc:
            response = CommandResponse(request.id, False, error=str(exc))
        except Exception as exc:  # an OS error (a full disk, a folder removed) or a bug: answer all the same
            log.exception("event=command_crashed name=%s id=%s", request.name, request.id)
            response = CommandResponse(request.id, False, error=f"{request.name} failed: {type(exc).__name__}: {exc}")
        log.info("event=command name=%s id=%s ok=%s", request.name, request.id, response.ok)
        if request.id in self._commands_seen:
            self._commands_seen[request.id] = response
        await self.transport.respond(response)

    # --- telemetry ----------------------------------------------------------------------
    async def _telemetry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.telemetry_interval_s)
            try:
                self.queue.append(self.collector.collect())
            except OSError as exc:  # e.g. a full disk: skip this record, keep serving
                log.error("event=telemetry_write_failed reason=%r", str(exc))
            self._drain_wake.set()

    async def _drain_loop(self) -> None:
        while True:
            await self._drain_wake.wait()
            self._drain_wake.clear()
            await self.drain_telemetry()

    async def drain_telemetry(self) -> None:
        """Send queued records oldest first while the link is up; stop at the first failure."""
        while len(self.queue) and self.transport.connected:
            batch = self.queue.peek(self.config.telemetry_batch_max)
            if not batch:
                return
            seqs = [seq for seq, _ in batch]
            payload = TelemetryBatch(self.config.device_id, [rec for _, rec in batch]).encode()
            if not await self.transport.send_telemetry(payload):
                self.queue.release(seqs)
                return  # retried on the next interval or reconnect
            self.queue.ack(seqs)
