"""The agent's persisted state: which version serves, which is kept for rollback, what was handled.

Written atomically (temp file, fsync, rename, fsync of the folder) after every
change, so after a crash or power cut at any instant the agent restarts into
the last version that was fully installed and switched to.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .durable import write_atomic
from .modelref import ModelRefError, ModelVersionRef

log = logging.getLogger("modelfleet.agent.state")


@dataclass
class Failure:
    """Why a desired `$version` was refused (final, not retried)."""

    version: int
    stage: str
    reason: str


@dataclass
class AgentState:
    """Everything the agent must remember across restarts."""

    active: ModelVersionRef | None = None
    previous: ModelVersionRef | None = None
    #: the last desired `$version` fully applied
    applied_version: int | None = None
    #: the last desired `$version` finished with (applied, refused, or rolled back from)
    handled_version: int | None = None
    #: the model that `handled_version` asked for (a controller that renumbers must not match by chance)
    handled_sha256: str | None = None
    failure: Failure | None = None

    def handled(self, version: int, sha256: str | None) -> bool:
        return self.handled_version == version and self.handled_sha256 == sha256

    def mark_handled(self, version: int, sha256: str | None) -> None:
        self.handled_version, self.handled_sha256 = version, sha256

    def to_dict(self) -> dict[str, Any]:
        return {
            "active": self.active.to_dict() if self.active else None,
            "previous": self.previous.to_dict() if self.previous else None,
            "applied_version": self.applied_version,
            "handled_version": self.handled_version,
            "handled_sha256": self.handled_sha256,
            "failure": vars(self.failure) if self.failure else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentState:
        failure = data.get("failure")
        return cls(
            active=ModelVersionRef.from_dict(data["active"]) if data.get("active") else None,
            previous=ModelVersionRef.from_dict(data["previous"]) if data.get("previous") else None,
            applied_version=data.get("applied_version"),
            handled_version=data.get("handled_version"),
            handled_sha256=data.get("handled_sha256"),
            failure=Failure(**failure) if isinstance(failure, dict) else None,
        )


class StateFile:
    """Loads and atomically saves an `AgentState` as JSON."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> AgentState:
        try:
            data = json.loads(self.path.read_text())
            return AgentState.from_dict(data)
        except FileNotFoundError:
            return AgentState()
        except (ValueError, KeyError, TypeError, ModelRefError) as exc:
            # only reachable by hand-editing: every write is atomic. Keep the file for inspection.
            bad = self.path.with_suffix(".corrupt")
            os.replace(self.path, bad)
            log.error("event=state_unreadable path=%s moved_to=%s reason=%r", self.path, bad, str(exc))
            return AgentState()

    def save(self, state: AgentState) -> None:
        write_atomic(self.path, json.dumps(state.to_dict(), sort_keys=True).encode())
