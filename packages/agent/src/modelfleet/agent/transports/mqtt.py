"""The MQTT transport (paho-mqtt 1.x): the twin protocol of `modelfleet.agent.protocol` on a broker.

paho runs its network loop in one background thread; every callback is handed
to the agent's event loop with `call_soon_threadsafe`, so the agent's own code
is single-threaded. paho reconnects by itself; on every (re)connect the agent
re-subscribes (the broker then re-sends the retained desired state), publishes
its birth message and re-publishes its latest reported state.

The session is persistent (clean_session=False under the device id as client
id): the broker keeps the QoS 1 subscriptions while the device is away and
queues the commands sent meanwhile, delivered when it comes back.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from ..errors import ProtocolError
from ..protocol import (
    DEFAULT_PREFIX,
    CommandRequest,
    CommandResponse,
    DesiredState,
    Presence,
    ReportedState,
    Topics,
)
from .base import TwinHandler

log = logging.getLogger("modelfleet.agent.mqtt")

_CONNACK = {
    1: "unacceptable protocol version",
    2: "client id rejected",
    3: "broker unavailable",
    4: "bad user name or password",
    5: "not authorised",
}


@dataclass(frozen=True)
class MqttSettings:
    """Where the broker is and who this device is."""

    device_id: str
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    prefix: str = DEFAULT_PREFIX
    keepalive_s: int = 30
    ca_file: Path | None = None
    tls: bool = False
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 5.0
    agent_version: str = ""
    tags: dict[str, Any] | None = None


class MqttTransport:
    """A `TwinTransport` over one paho client."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.device_id, settings.prefix)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handler: TwinHandler | None = None
        self._connected = False
        self._last_reported: bytes | None = None
        self._pending: dict[int, asyncio.Future[bool]] = {}
        self._connector: asyncio.Task[None] | None = None
        self._client = self._make_client()

    @property
    def connected(self) -> bool:
        return self._connected

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        # persistent: commands published while the device is offline wait for it at the broker
        client = mqtt.Client(client_id=s.device_id, clean_session=False, protocol=mqtt.MQTTv311)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls or s.ca_file is not None:
            client.tls_set(ca_certs=str(s.ca_file) if s.ca_file else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        # the broker publishes this for us when the link dies without a DISCONNECT
        # tags ride along so a fleet controller that only sees this retained message still
        # knows how to target the (offline) device
        will = Presence(
            s.device_id, online=False, agent_version=s.agent_version, tags=s.tags
        ).encode()
        client.will_set(self.topics.presence, will, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=s.reconnect_min_s, max_delay=s.reconnect_max_s)
        client.max_inflight_messages_set(100)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    # --- lifecycle --------------------------------------------------------------
    async def start(self, handler: TwinHandler) -> None:
        self._loop = asyncio.get_running_loop()
        self._handler = handler
        s = self.settings
        log.info("event=mqtt_connecting host=%s port=%d device=%s", s.host, s.port, s.device_id)
        self._connector = asyncio.create_task(self._first_connect(), name="mqtt-connect")

    async def _first_connect(self) -> None:
        """Connect, retrying with backoff and logging why (paho's own retry loop hides the reason,
        e.g. a certificate the device does not trust); after that paho reconnects by itself."""
        s = self.settings
        loop = asyncio.get_running_loop()
        delay = s.reconnect_min_s
        while True:
            try:
                await loop.run_in_executor(None, self._client.connect, s.host, s.port, s.keepalive_s)
                break
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                log.warning("event=mqtt_connect_failed host=%s port=%d reason=%r retry_in_s=%.1f",
                            s.host, s.port, str(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, s.reconnect_max_s)
        self._client.loop_start()

    async def stop(self) -> None:
        if self._connector is not None and not self._connector.done():
            self._connector.cancel()
        if self._connected:
            bye = Presence(
                self.settings.device_id, online=False, ts=time.time(),
                agent_version=self.settings.agent_version, clean=True, tags=self.settings.tags,
            ).encode()
            await self._publish(self.topics.presence, bye, retain=True, timeout=2.0)
        self._client.disconnect()
        await asyncio.get_running_loop().run_in_executor(None, self._client.loop_stop)
        self._connected = False
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result(False)
        self._pending.clear()

    # --- sending ----------------------------------------------------------------
    async def report(self, state: ReportedState) -> None:
        self._last_reported = state.encode()
        if self._connected:
            self._client.publish(self.topics.reported, self._last_reported, qos=1, retain=True)

    async def send_telemetry(self, payload: bytes, timeout: float = 10.0) -> bool:
        if not self._connected:
            return False
        return await self._publish(self.topics.telemetry, payload, retain=False, timeout=timeout)

    async def respond(self, response: CommandResponse) -> None:
        if self._connected:
            self._client.publish(self.topics.responses, response.encode(), qos=1)

    async def _publish(self, topic: str, payload: bytes, *, retain: bool, timeout: float) -> bool:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        assert self._loop is not None
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        # registered before the event loop can run the ack callback: it is queued behind us
        fut: asyncio.Future[bool] = self._loop.create_future()
        self._pending[info.mid] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        finally:
            self._pending.pop(info.mid, None)

    # --- paho callbacks (paho's thread) -------------------------------------------
    def _call(self, fn: Any, *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: int) -> None:
        if rc != 0:
            log.warning("event=mqtt_refused rc=%d reason=%r", rc, _CONNACK.get(rc, "unknown"))
            return
        client.subscribe([(self.topics.desired, 1), (self.topics.commands, 1)])
        birth = Presence(
            self.settings.device_id, online=True, ts=time.time(), agent_version=self.settings.agent_version,
            tags=self.settings.tags,
        ).encode()
        client.publish(self.topics.presence, birth, qos=1, retain=True)
        if self._last_reported is not None:
            client.publish(self.topics.reported, self._last_reported, qos=1, retain=True)
        log.info("event=mqtt_connected device=%s", self.settings.device_id)
        self._call(self._set_connected, True)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, rc: int) -> None:
        if rc != 0:
            log.warning("event=mqtt_disconnected rc=%d", rc)
        self._call(self._set_connected, False)

    def _set_connected(self, value: bool) -> None:
        if value == self._connected:
            return
        self._connected = value
        if not value:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_result(False)
        if self._handler is not None:
            self._handler.on_connection(value)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int) -> None:
        self._call(self._acked, mid)

    def _acked(self, mid: int) -> None:
        fut = self._pending.get(mid)  # None for fire-and-forget publishes
        if fut is not None and not fut.done():
            fut.set_result(True)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._call(self._dispatch, msg.topic, bytes(msg.payload))

    def _dispatch(self, topic: str, payload: bytes) -> None:
        handler = self._handler
        if handler is None:
            return
        if topic == self.topics.desired:
            if not payload:  # a cleared retained message: nothing desired
                return
            try:
                state = DesiredState.decode(payload)
            except ProtocolError as exc:
                log.warning("event=bad_desired reason=%r", str(exc))
                handler.on_bad_desired(str(exc), DesiredState.version_of(payload))
                return
            handler.on_desired(state)
        elif topic == self.topics.commands:
            try:
                request = CommandRequest.decode(payload)
            except ProtocolError as exc:
                log.warning("event=bad_command reason=%r", str(exc))
                self._client.publish(
                    self.topics.responses,
                    CommandResponse(CommandRequest.id_of(payload), False, error=str(exc)).encode(),
                    qos=1,
                )
                return
            handler.on_command(request)
