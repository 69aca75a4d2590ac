"""Many simulated devices in one process: the agent's real reconciler and protocol, no models.

Every simulated device is a paho client whose socket sits on the one asyncio
(epoll) loop of this thread; paho's own threads and socketpairs are never
started, so a device costs one file descriptor. Each device runs the agent's
`Reconciler` with a model store and a scoring host that do no I/O: the
desired -> applying -> applied reports, `$version` handling and presence are
the agent's own code paths. Used by `benchmarks/fleet.py` and the fleet tests.

    python -m modelfleet.deployer.fleet.simulator --broker mqtt://127.0.0.1:1883 --count 1000
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import resource
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt

from modelfleet.agent import reconciler as reconciler_module
from modelfleet.agent.errors import ProtocolError
from modelfleet.agent.modelref import ModelVersionRef
from modelfleet.agent.protocol import DEFAULT_PREFIX, DesiredState, Presence, ReportedState, Topics
from modelfleet.agent.reconciler import Reconciler
from modelfleet.agent.state import AgentState, StateFile
from modelfleet.agent.store import ModelStore
from modelfleet.scoring import ModelHost, ModelLoadError, ModelSpec

log = logging.getLogger("modelfleet.fleet.simulator")

_MAX_CONNECTING = 64  # stay under mosquitto's listen backlog (see the MQTT-at-scale note)


class _LoopClient(mqtt.Client):  # type: ignore[misc]
    """A paho client that connects without binding first and closes with a reset.

    paho binds to port 0 before connecting; such ephemeral ports cannot be reused
    while in TIME_WAIT, and back-to-back runs of thousands of clients run out.
    """

    def _create_socket_connection(self) -> socket.socket:
        sock = socket.create_connection((self._host, self._port), timeout=self._connect_timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return sock


# ---------------------------------------------------------------- model-free stand-ins


class _NoopStore:
    """The `ModelStore` surface the reconciler uses, with nothing downloaded."""

    def __init__(self) -> None:
        self._installed: set[str] = set()

    def fetch(self, ref: ModelVersionRef, cancel: threading.Event | None = None) -> Path:
        self._installed.add(ref.sha256)
        return Path("/nonexistent")

    def is_installed(self, ref: ModelVersionRef) -> bool:
        return ref.sha256 in self._installed

    def model_dir(self, ref: ModelVersionRef) -> Path:
        return Path("/nonexistent") / ref.sha256

    def prune(self, keep: set[str]) -> None:
        self._installed &= keep


@dataclass(frozen=True)
class _Loaded:
    name: str
    version: str
    spec: ModelSpec


class _NoopHost:
    """The `ModelHost` surface the reconciler uses: "loads" instantly, or fails warm-up on request."""

    def __init__(self, fail_versions: frozenset[int]) -> None:
        self.active: _Loaded | None = None
        self._fail = fail_versions

    async def aload(self, spec: ModelSpec) -> _Loaded:
        if int(spec.version) in self._fail:
            raise ModelLoadError(stage="warmup", reason=f"simulated warm-up failure of version {spec.version}")
        self.active = _Loaded(spec.name, spec.version, spec)
        return self.active


class _MemoryStateFile:
    def __init__(self) -> None:
        self.state = AgentState()

    def load(self) -> AgentState:
        return self.state

    def save(self, state: AgentState) -> None:
        self.state = state


class _InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs `run_in_executor` work on the spot. The stand-ins never block, and a thread pool
    shared by thousands of devices spends its time handing the GIL back and forth."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


# ---------------------------------------------------------------- one device


class SimulatedDevice:
    """One device: a paho client on the shared loop and the agent's reconciler."""

    def __init__(self, fleet: SimulatedFleet, device_id: str, tags: Mapping[str, Any]) -> None:
        self.fleet = fleet
        self.device_id = device_id
        self.tags = dict(tags)
        self.topics = Topics(device_id, fleet.prefix)
        self.connected = asyncio.Event()
        self._last_reported: bytes | None = None
        self.client = _LoopClient(client_id=device_id, clean_session=True, protocol=mqtt.MQTTv311)
        will = Presence(device_id, online=False, tags=self.tags).encode()
        self.client.will_set(self.topics.presence, will, qos=1, retain=True)
        self.client.max_inflight_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        loop = fleet.loop
        self.client.on_socket_open = lambda c, u, s: loop.add_reader(s, c.loop_read)
        self.client.on_socket_close = lambda c, u, s: loop.remove_reader(s)
        self.client.on_socket_register_write = lambda c, u, s: loop.add_writer(s, c.loop_write)
        self.client.on_socket_unregister_write = lambda c, u, s: loop.remove_writer(s)
        self.reconciler = Reconciler(
            device_id=device_id,
            store=cast(ModelStore, _NoopStore()),
            host=cast(ModelHost, _NoopHost(fleet.fail_versions)),
            state_file=cast(StateFile, _MemoryStateFile()),
            report=self._report,
            agent_version="simulated",
        )
        self.task: asyncio.Task[None] | None = None

    def connect(self) -> None:
        self.client.connect(self.fleet.host, self.fleet.port, keepalive=120)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: int) -> None:
        if rc != 0:
            log.warning("event=refused device=%s rc=%d", self.device_id, rc)
            return
        client.subscribe(self.topics.desired, qos=1)
        birth = Presence(self.device_id, True, ts=time.time(), agent_version="simulated", tags=self.tags)
        client.publish(self.topics.presence, birth.encode(), qos=1, retain=True)
        if self._last_reported is not None:
            client.publish(self.topics.reported, self._last_reported, qos=1, retain=True)
        self.connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        if self.fleet.bare:
            # the protocol floor: answer at once, no reconciler, no decoding beyond the version
            version = json.loads(msg.payload).get("$version")
            reply = ReportedState(self.device_id, version, "applied", applied_version=version).encode()
            client.publish(self.topics.reported, reply, qos=1, retain=True)
            return
        try:
            state = DesiredState.decode(msg.payload)
        except ProtocolError as exc:
            version = DesiredState.version_of(msg.payload)
            self.fleet.loop.create_task(self.reconciler.on_bad_desired(str(exc), version))
            return
        self.reconciler.on_desired(state)

    async def _report(self, state: ReportedState) -> None:
        self._last_reported = state.encode()
        self.client.publish(self.topics.reported, self._last_reported, qos=1, retain=True)

    def disconnect(self, clean: bool = True) -> None:
        if clean:
            bye = Presence(
                self.device_id, online=False, ts=time.time(), clean=True, tags=self.tags
            ).encode()
            self.client.publish(self.topics.presence, bye, qos=1, retain=True)
            self.client.disconnect()
        else:
            self.client._sock_close()  # vanish: the broker publishes the last will


# ---------------------------------------------------------------- the fleet


class SimulatedFleet:
    """N simulated devices on the running asyncio loop."""

    def __init__(
        self,
        host: str,
        port: int,
        count: int,
        *,
        prefix: str = DEFAULT_PREFIX,
        id_format: str = "sim-{:05d}",
        tags: Mapping[str, Any] | None = None,
        fail_versions: frozenset[int] = frozenset(),
        bare: bool = False,
    ) -> None:
        self.host, self.port, self.count = host, port, count
        self.bare = bare
        self.prefix = prefix
        self.id_format = id_format
        self.tags = dict(tags or {})
        self.fail_versions = fail_versions
        self.loop = asyncio.get_running_loop()
        self.loop.set_default_executor(_InlineExecutor())
        # the reconciler trims the C heap after every swap (a real device just freed a model);
        # here nothing was freed, and 10,000 trims of one big heap (each also looking libc up
        # with `ldconfig`) would cost more than the rest of the simulation
        reconciler_module.trim_heap = lambda: None  # type: ignore[attr-defined]
        self.devices: list[SimulatedDevice] = []
        self._misc: asyncio.Task[None] | None = None

    async def start(self) -> float:
        """Connect every device (at most 64 awaiting CONNACK); seconds it took."""
        started = time.perf_counter()
        for i in range(self.count):
            tags = {**self.tags, "index": i, "ring": i % 10}
            self.devices.append(SimulatedDevice(self, self.id_format.format(i), tags))
        window = asyncio.Semaphore(_MAX_CONNECTING)

        async def connect(dev: SimulatedDevice) -> None:
            async with window:
                dev.connect()
                await asyncio.wait_for(dev.connected.wait(), 30)
            if not self.bare:
                dev.task = self.loop.create_task(dev.reconciler.run())

        await asyncio.gather(*(connect(d) for d in self.devices))
        self._misc = self.loop.create_task(self._loop_misc())
        return time.perf_counter() - started

    async def _loop_misc(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for d in self.devices:
                d.client.loop_misc()

    async def stop(self) -> None:
        if self._misc:
            self._misc.cancel()
        for d in self.devices:
            if d.task:
                d.task.cancel()
            d.disconnect(clean=False)

    def applied(self, model_version: int) -> int:
        """How many devices serve `model_version`."""
        return sum(
            1
            for d in self.devices
            if d.reconciler.state.active is not None and d.reconciler.state.active.version == model_version
        )




def raise_nofile(target: int = 65536) -> int:
    """Raise RLIMIT_NOFILE towards `target` (children inherit it); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(target, hard) if hard != resource.RLIM_INFINITY else target
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _amain(args: argparse.Namespace) -> None:
    from urllib.parse import urlsplit

    url = urlsplit(args.broker)
    fleet = SimulatedFleet(
        url.hostname or "127.0.0.1",
        url.port or 1883,
        args.count,
        prefix=args.prefix,
        id_format=args.id_format,
        tags=json.loads(args.tags),
        fail_versions=frozenset(args.fail_version or ()),
        bare=args.bare,
    )
    took = await fleet.start()
    print(json.dumps({"event": "ready", "devices": args.count, "connect_s": round(took, 3)}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        fleet.loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await fleet.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modelfleet.deployer.fleet.simulator", description=__doc__)
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX)
    parser.add_argument("--id-format", default="sim-{:05d}")
    parser.add_argument("--tags", default="{}", help="JSON object of tags every device declares")
    parser.add_argument("--fail-version", type=int, action="append", help="model versions whose warm-up fails")
    parser.add_argument("--bare", action="store_true", help="reply 'applied' at once, without the reconciler (the floor)")
    args = parser.parse_args(argv)
    raise_nofile()
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_amain(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
