"""The agent's persisted state: which version serves, which is kept for rollback, what was handled.

Written atomically (temp file, fsync, rename, fsync of the folder) after every
change, so after a crash or power cut at any instant the agent restarts into
the last version that was fully installed and switched to. A file that is
unreadable all the same (a file system that lost the data behind a durable
rename, a disk error, a hand edit) is set aside and reported through `lost`;
the reconciler then rebuilds what it can from the model store.
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
    def from_dict(cls, data: Any) -> AgentState:
        """Raises ValueError (or ModelRefError) for anything but a state this module wrote."""
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        for key in ("applied_version", "handled_version"):
            value = data.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{key!r} must be an integer or null")
        if data.get("handled_sha256") is not None and not isinstance(data["handled_sha256"], str):
            raise ValueError("'handled_sha256' must be a string or null")
        failure = data.get("failure")
        if failure is not None:
            if not isinstance(failure, dict) or set(failure) != {"version", "stage", "reason"}:
                raise ValueError("'failure' must be {version, stage, reason} or null")
            failure = Failure(**failure)
        return cls(
            active=ModelVersionRef.from_dict(data["active"]) if data.get("active") else None,
            previous=ModelVersionRef.from_dict(data["previous"]) if data.get("previous") else None,
            applied_version=data.get("applied_version"),
            handled_version=data.get("handled_version"),
            handled_sha256=data.get("handled_sha256"),
            failure=failure,
        )


class StateFile:
    """Loads and atomically saves an `AgentState` as JSON."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        #: why the last `load()` found no state (no file, or an unreadable one); None when it read one
        self.lost: str | None = None

    def load(self) -> AgentState:
        # a write cut short by a crash: the rename never happened, so state.json is the one to trust
        self.path.with_name(self.path.name + ".tmp").unlink(missing_ok=True)
        self.lost = None
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self.lost = f"{self.path} does not exist"
            return AgentState()
        except OSError as exc:
            return self._set_aside(f"cannot read it: {exc.strerror or exc}")
        try:
            return AgentState.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError, ModelRefError) as exc:
            what = "it is empty" if not raw.strip(b"\0 \n") else f"it is not a state this agent wrote: {exc}"
            return self._set_aside(what)

    def _set_aside(self, why: str) -> AgentState:
        # keep the file for inspection; every write is atomic, so this takes a power cut on a file
        # system that lost the data behind a durable rename, a disk error or a hand edit
        bad = self.path.with_suffix(".corrupt")
        try:
            os.replace(self.path, bad)
        except OSError:
            bad = self.path
        self.lost = f"{self.path} was unreadable ({why}); set aside as {bad.name}"
        log.error("event=state_unreadable path=%s moved_to=%s reason=%r", self.path, bad, why)
        return AgentState()

    def save(self, state: AgentState) -> None:
        write_atomic(self.path, json.dumps(state.to_dict(), sort_keys=True).encode())
