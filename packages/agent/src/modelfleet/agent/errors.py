"""The agent's error hierarchy: every failure the agent reports or refuses with is one of these."""

from __future__ import annotations


class AgentError(Exception):
    """Base of all modelfleet-agent errors."""


class ConfigError(AgentError):
    """The agent's configuration is invalid; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"config: {field}: {message}")
        self.field = field


class ProtocolError(AgentError):
    """A twin-protocol message could not be decoded; the message names what was wrong."""


class ApplyError(AgentError):
    """Applying a model version failed at `stage` ("download", "verify", "install", "load", "warmup", ...).

    `transient` errors (network, server 5xx) are retried with backoff; the rest
    are final for that desired `$version` (retrying would give the same answer).
    """

    def __init__(self, stage: str, reason: str, *, transient: bool = False) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason
        self.transient = transient


class ArtifactError(ApplyError):
    """Downloading, verifying or installing a model artifact failed."""


class Superseded(AgentError):
    """A newer desired state arrived; the work in progress was abandoned on purpose."""
