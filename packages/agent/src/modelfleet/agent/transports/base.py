"""The transport interface: how the agent receives desired states and commands and sends reports.

The reconciler and the telemetry sender only see this interface, so a second
backend (Azure IoT Hub twins) slots in beside `mqtt.py` without touching them.
Callbacks are invoked on the agent's event loop, never on a transport thread.
"""

from __future__ import annotations

from typing import Protocol

from ..protocol import CommandRequest, CommandResponse, DesiredState, ReportedState


class TwinHandler(Protocol):
    """What the agent provides to a transport."""

    def on_desired(self, state: DesiredState) -> None:
        """A (possibly repeated) desired state arrived."""

    def on_bad_desired(self, reason: str, version: int | None) -> None:
        """A desired state arrived that could not be decoded; `reason` names what was wrong,
        `version` is its `$version` when that much could be read."""

    def on_command(self, request: CommandRequest) -> None:
        """A command arrived; answer it with `TwinTransport.respond`."""

    def on_connection(self, connected: bool) -> None:
        """The link to the fleet backend came up (after connect or reconnect) or went down."""


class TwinTransport(Protocol):
    """One device's link to its fleet backend."""

    @property
    def connected(self) -> bool:
        """True while the link is up."""

    async def start(self, handler: TwinHandler) -> None:
        """Connect (retrying in the background when the backend is not reachable yet)."""

    async def stop(self) -> None:
        """Say goodbye (presence offline) and disconnect."""

    async def report(self, state: ReportedState) -> None:
        """Publish the reported state (retained). Best effort: the latest one is re-sent on reconnect."""

    async def send_telemetry(self, payload: bytes, timeout: float = 10.0) -> bool:
        """Publish one telemetry batch; True once the backend acknowledged it."""

    async def respond(self, response: CommandResponse) -> None:
        """Answer a command."""
