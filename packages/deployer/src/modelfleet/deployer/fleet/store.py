"""Persisted fleet state: rollouts, their devices and central device tags.

The tables live in the registry database (`$MODELFLEET_HOME/registry.db`),
created here. Every engine step commits before it publishes anything that
depends on it, so a controller killed at any instant resumes from the rows.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet.agent.modelref import ModelVersionRef
from modelfleet.deployer import sqlitedb
from modelfleet.deployer.errors import DeployerError
from modelfleet.deployer.home import modelfleet_home

ACTIVE_STATES = ("running", "paused")
TERMINAL_STATES = ("succeeded", "failed", "aborted", "rolled_back")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_rollouts (
    name TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    target TEXT NOT NULL,
    stages TEXT NOT NULL,
    max_failure REAL NOT NULL,
    soak_s REAL NOT NULL,
    timeout_s REAL NOT NULL,
    max_error_rate REAL NOT NULL,
    max_p99_ms REAL,
    min_soak_requests INTEGER NOT NULL DEFAULT 0,
    backend TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL,
    stage INTEGER NOT NULL DEFAULT 0,
    phase TEXT NOT NULL DEFAULT 'deploying',
    stage_started_at REAL,
    soak_started_at REAL,
    stage_elapsed_s REAL NOT NULL DEFAULT 0,
    soak_elapsed_s REAL NOT NULL DEFAULT 0,
    reason TEXT,
    stage_log TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fleet_rollout_devices (
    rollout TEXT NOT NULL,
    device_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    stage INTEGER NOT NULL,
    state TEXT NOT NULL,
    desired_version INTEGER,
    previous TEXT,
    reason TEXT,
    updated_at REAL NOT NULL,
    joined INTEGER NOT NULL DEFAULT 0,
    confirmed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (rollout, device_id)
);
CREATE INDEX IF NOT EXISTS fleet_rollout_devices_device ON fleet_rollout_devices (device_id);
CREATE INDEX IF NOT EXISTS fleet_rollout_devices_stage ON fleet_rollout_devices (rollout, stage, state);
CREATE TABLE IF NOT EXISTS fleet_tags (
    device_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (device_id, key)
);
"""

# columns added after the first release: a database made before gets them on open
_ADDED_COLUMNS = {
    "fleet_rollouts": {
        "stage_elapsed_s": "REAL NOT NULL DEFAULT 0",
        "soak_elapsed_s": "REAL NOT NULL DEFAULT 0",
        "min_soak_requests": "INTEGER NOT NULL DEFAULT 0",
    },
    "fleet_rollout_devices": {
        "joined": "INTEGER NOT NULL DEFAULT 0",
        "confirmed": "INTEGER NOT NULL DEFAULT 0",
    },
}


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    def columns_of(table: str) -> set[str]:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}

    for table, columns in _ADDED_COLUMNS.items():
        if columns.keys() <= columns_of(table):
            continue
        # under the write lock, looked at again: another process may be adding them right now
        with sqlitedb.write_transaction(conn):
            have = columns_of(table)
            for column, ddl in columns.items():
                if column in have:
                    continue
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
                if column == "confirmed":
                    # rows rolled back before: their `$version` is the rollout's, not the rollback's,
                    # so a report on it says nothing about the rollback (a failure on the rollout's
                    # version would read as "refused the rollback"); they are not looked up
                    conn.execute(
                        "UPDATE fleet_rollout_devices SET desired_version = NULL WHERE state = 'rolled_back'"
                    )


class FleetError(DeployerError):
    """A fleet operation was refused; the message says why."""


class RolloutNotFoundError(FleetError):
    default_hint = "run `modelfleet fleet rollout list` to see rollouts"


class RolloutConflictError(FleetError):
    default_hint = "wait for the other rollout to finish, or abort it, or narrow --target"


@dataclass
class Rollout:
    """One rollout's persisted state."""

    name: str
    model: ModelVersionRef
    target: str
    stages: list[int]
    max_failure: float
    soak_s: float
    timeout_s: float
    max_error_rate: float
    max_p99_ms: float | None
    backend: dict[str, Any]
    min_soak_requests: int = 0
    state: str = "running"
    stage: int = 0
    phase: str = "deploying"  # deploying | soaking
    stage_started_at: float | None = None
    soak_started_at: float | None = None
    # seconds a controller watched the stage / its soak: time paused or with no controller
    # running is not counted, so a pause or a dead controller does not eat the timeout
    stage_elapsed_s: float = 0.0
    soak_elapsed_s: float = 0.0
    reason: str | None = None
    stage_log: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


@dataclass
class RolloutDevice:
    """One device's progress in a rollout."""

    rollout: str
    device_id: str
    position: int
    stage: int
    # waiting (not yet issued) | issuing | pending | applied | failed | timeout | late
    # (applied after it timed out) | rolled_back
    state: str = "waiting"
    desired_version: int | None = None
    previous: ModelVersionRef | None = None
    reason: str | None = None
    updated_at: float = 0.0
    joined: bool = False  # matched the target after the rollout was created
    confirmed: bool = False  # rolled back, and the device reported on the rollback


def _row_rollout(row: sqlite3.Row) -> Rollout:
    return Rollout(
        name=row["name"],
        model=ModelVersionRef.from_dict(json.loads(row["model"])),
        target=row["target"],
        stages=json.loads(row["stages"]),
        max_failure=row["max_failure"],
        soak_s=row["soak_s"],
        timeout_s=row["timeout_s"],
        max_error_rate=row["max_error_rate"],
        max_p99_ms=row["max_p99_ms"],
        min_soak_requests=row["min_soak_requests"],
        backend=json.loads(row["backend"]),
        state=row["state"],
        stage=row["stage"],
        phase=row["phase"],
        stage_started_at=row["stage_started_at"],
        soak_started_at=row["soak_started_at"],
        stage_elapsed_s=row["stage_elapsed_s"],
        soak_elapsed_s=row["soak_elapsed_s"],
        reason=row["reason"],
        stage_log=json.loads(row["stage_log"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _row_device(row: sqlite3.Row) -> RolloutDevice:
    prev = row["previous"]
    return RolloutDevice(
        rollout=row["rollout"],
        device_id=row["device_id"],
        position=row["position"],
        stage=row["stage"],
        state=row["state"],
        desired_version=row["desired_version"],
        previous=ModelVersionRef.from_dict(json.loads(prev)) if prev else None,
        reason=row["reason"],
        updated_at=row["updated_at"],
        joined=bool(row["joined"]),
        confirmed=bool(row["confirmed"]),
    )


def _first_clash(conn: sqlite3.Connection, devices_sql: str, args: Sequence[Any]) -> str | None:
    """'rollout NAME (STATE): device ID (and N more devices) is already in it' for the devices
    `devices_sql` selects that an active rollout holds; None when there are none."""
    row = conn.execute(
        "SELECT d.device_id, r.name, r.state, COUNT(*) OVER () AS n "
        f"FROM ({devices_sql}) w JOIN fleet_rollout_devices d ON d.device_id = w.device_id "
        "JOIN fleet_rollouts r ON r.name = d.rollout "
        f"WHERE r.state IN ({','.join('?' * len(ACTIVE_STATES))}) "
        "ORDER BY d.device_id LIMIT 1",
        (*args, *ACTIVE_STATES),
    ).fetchone()
    if row is None:
        return None
    more = f" (and {row['n'] - 1} more devices)" if row["n"] > 1 else ""
    return f"rollout {row['name']!r} ({row['state']}): device {row['device_id']!r}{more} is already in it"


class FleetStore:
    """Fleet tables in the registry database."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = home if home is not None else modelfleet_home()
        self.db_path = self.home / "registry.db"
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            with self._connect() as conn:
                conn.executescript(_SCHEMA)
                _add_missing_columns(conn)
        except (OSError, sqlite3.Error) as exc:
            raise FleetError(
                f"cannot open the fleet state in {self.db_path}: {exc}",
                hint="set MODELFLEET_HOME to a writable folder",
            ) from exc

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # one connection for the store's lifetime: opening and closing one per call
        # checkpoints the WAL every time, which dominated a 10,000-device rollout step
        with self._lock:
            if self._conn is None:
                conn = sqlitedb.connect(self.db_path, check_same_thread=False)
                # NORMAL in WAL mode: a process crash loses nothing; an OS crash may lose the last
                # step, which the engine repeats (every step is idempotent)
                sqlitedb.set_pragmas(conn, synchronous="NORMAL")
                self._conn = conn
            try:
                yield self._conn
            except sqlite3.OperationalError as exc:
                # a full disk, a read-only home, "database is locked" after the busy timeout:
                # the transaction was rolled back, so a retry (or `rollout resume`) starts clean
                raise FleetError(
                    f"fleet state in {self.db_path}: {exc}",
                    hint="check disk space and that MODELFLEET_HOME is writable, then retry",
                ) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn, sqlitedb.write_transaction(conn) as tx:
            yield tx

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ------------------------------------------------------------------ rollouts

    def create(self, rollout: Rollout, device_ids: Sequence[str], stage_of: Sequence[int]) -> None:
        """Insert a rollout and its ordered devices, refusing conflicts in the same transaction."""
        now = time.time()
        rollout.created_at = rollout.updated_at = now
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM fleet_rollouts WHERE name = ?", (rollout.name,)).fetchone():
                raise FleetError(
                    f"a rollout named {rollout.name!r} already exists",
                    hint="pick another name, or see it with `modelfleet fleet rollout status`",
                )
            conn.execute("CREATE TEMP TABLE wanted (device_id TEXT PRIMARY KEY)")
            conn.executemany("INSERT INTO wanted VALUES (?)", ((d,) for d in device_ids))
            clash = _first_clash(conn, "SELECT device_id FROM wanted", ())
            conn.execute("DROP TABLE wanted")
            if clash:
                raise RolloutConflictError(f"rollout {rollout.name!r} conflicts with {clash}")
            conn.execute(
                "INSERT INTO fleet_rollouts (name, model, target, stages, max_failure, soak_s, timeout_s, "
                "max_error_rate, max_p99_ms, min_soak_requests, backend, state, stage, phase, stage_log, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 'deploying', '[]', ?, ?)",
                (
                    rollout.name,
                    json.dumps(rollout.model.to_dict()),
                    rollout.target,
                    json.dumps(rollout.stages),
                    rollout.max_failure,
                    rollout.soak_s,
                    rollout.timeout_s,
                    rollout.max_error_rate,
                    rollout.max_p99_ms,
                    rollout.min_soak_requests,
                    json.dumps(rollout.backend),
                    rollout.state,
                    now,
                    now,
                ),
            )
            conn.executemany(
                "INSERT INTO fleet_rollout_devices (rollout, device_id, position, stage, state, updated_at) "
                "VALUES (?, ?, ?, ?, 'waiting', ?)",
                ((rollout.name, d, i, s, now) for i, (d, s) in enumerate(zip(device_ids, stage_of, strict=True))),
            )

    def add_devices(self, name: str, device_ids: Sequence[str], stage: int) -> list[str]:
        """Append devices that joined the target to a stage (after every device already in the
        rollout, in the given order), skipping those another active rollout holds; the added ids."""
        if not device_ids:
            return []
        now = time.time()
        with self._write() as conn:
            conn.execute("CREATE TEMP TABLE joining (device_id TEXT PRIMARY KEY)")
            try:
                conn.executemany("INSERT OR IGNORE INTO joining VALUES (?)", ((d,) for d in device_ids))
                held = {
                    row[0]
                    for row in conn.execute(
                        "SELECT d.device_id FROM joining j JOIN fleet_rollout_devices d ON d.device_id = j.device_id "
                        "JOIN fleet_rollouts r ON r.name = d.rollout "
                        f"WHERE r.state IN ({','.join('?' * len(ACTIVE_STATES))}) OR d.rollout = ?",
                        (*ACTIVE_STATES, name),
                    )
                }
            finally:
                conn.execute("DROP TABLE joining")
            added = [d for d in dict.fromkeys(device_ids) if d not in held]
            start = conn.execute(
                "SELECT COALESCE(MAX(position), -1) + 1 FROM fleet_rollout_devices WHERE rollout = ?", (name,)
            ).fetchone()[0]
            conn.executemany(
                "INSERT INTO fleet_rollout_devices (rollout, device_id, position, stage, state, updated_at, joined) "
                "VALUES (?, ?, ?, ?, 'waiting', ?, 1)",
                ((name, d, start + i, stage, now) for i, d in enumerate(added)),
            )
        return added

    def member_ids(self, name: str) -> set[str]:
        """Every device id in a rollout."""
        with self._connect() as conn:
            return {r[0] for r in conn.execute("SELECT device_id FROM fleet_rollout_devices WHERE rollout = ?", (name,))}

    def get(self, name: str) -> Rollout:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM fleet_rollouts WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise RolloutNotFoundError(f"no rollout named {name!r}")
        return _row_rollout(row)

    def all(self) -> list[Rollout]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM fleet_rollouts ORDER BY created_at").fetchall()
        return [_row_rollout(r) for r in rows]

    def save(self, rollout: Rollout, *, force: bool = False) -> bool:
        """Write a rollout's progress. Unless `force`, only while the stored state is still
        `running` (or already the new state): an operator's pause/abort wins over a controller."""
        rollout.updated_at = time.time()
        guard = "" if force else " AND state IN ('running', ?)"
        with self._write() as conn:
            return conn.execute(
                "UPDATE fleet_rollouts SET state = ?, stage = ?, phase = ?, stage_started_at = ?, "
                "soak_started_at = ?, stage_elapsed_s = ?, soak_elapsed_s = ?, reason = ?, stage_log = ?, "
                "updated_at = ? WHERE name = ?" + guard,
                (
                    rollout.state,
                    rollout.stage,
                    rollout.phase,
                    rollout.stage_started_at,
                    rollout.soak_started_at,
                    rollout.stage_elapsed_s,
                    rollout.soak_elapsed_s,
                    rollout.reason,
                    json.dumps(rollout.stage_log),
                    rollout.updated_at,
                    rollout.name,
                    *(() if force else (rollout.state,)),
                ),
            ).rowcount == 1

    def set_state(self, name: str, state: str, *, only_from: Iterable[str] | None = None) -> bool:
        """Change a rollout's state (optionally only from given states); False if it did not apply."""
        with self._write() as conn:
            sql = "UPDATE fleet_rollouts SET state = ?, updated_at = ? WHERE name = ?"
            args: list[Any] = [state, time.time(), name]
            if only_from is not None:
                states = list(only_from)
                sql += f" AND state IN ({','.join('?' * len(states))})"
                args += states
            return conn.execute(sql, args).rowcount == 1

    # ------------------------------------------------------------------ devices

    def devices(self, name: str, *, stage: int | None = None, states: Iterable[str] | None = None) -> list[RolloutDevice]:
        sql = "SELECT * FROM fleet_rollout_devices WHERE rollout = ?"
        args: list[Any] = [name]
        if stage is not None:
            sql += " AND stage = ?"
            args.append(stage)
        if states is not None:
            wanted = list(states)
            sql += f" AND state IN ({','.join('?' * len(wanted))})"
            args += wanted
        with self._connect() as conn:
            rows = conn.execute(sql + " ORDER BY position", args).fetchall()
        return [_row_device(r) for r in rows]

    def clash(self, name: str) -> str | None:
        """Whether another active rollout holds a device this one touched (issued to), and which."""
        with self._connect() as conn:
            return _first_clash(
                conn,
                "SELECT device_id FROM fleet_rollout_devices "
                "WHERE rollout = ? AND state NOT IN ('waiting', 'rolled_back')",
                (name,),
            )

    def holder(self, device_id: str) -> Rollout | None:
        """The active (running or paused) rollout that holds a device, if any."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT r.* FROM fleet_rollout_devices d JOIN fleet_rollouts r ON r.name = d.rollout "
                f"WHERE d.device_id = ? AND r.state IN ({','.join('?' * len(ACTIVE_STATES))}) LIMIT 1",
                (device_id, *ACTIVE_STATES),
            ).fetchone()
        return _row_rollout(row) if row else None

    # the hot path of a step touches only (device, state, $version, reason): at 10,000
    # devices, parsing every row's previous model reference dominated the step

    def moving(self, name: str, stage: int) -> list[tuple[str, str, int | None]]:
        """(device, state, desired $version) of a stage's devices still waiting, issuing or pending."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT device_id, state, desired_version FROM fleet_rollout_devices "
                "WHERE rollout = ? AND stage = ? AND state IN ('waiting', 'issuing', 'pending') ORDER BY position",
                (name, stage),
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def set_states(self, name: str, changes: Iterable[tuple[str, str, int | None, str | None]]) -> None:
        """Apply (device, state, desired $version, reason) changes in one transaction."""
        now = time.time()
        rows = [(state, version, reason, now, name, device) for device, state, version, reason in changes]
        if not rows:
            return
        with self._write() as conn:
            conn.executemany(
                "UPDATE fleet_rollout_devices SET state = ?, desired_version = ?, reason = ?, updated_at = ? "
                "WHERE rollout = ? AND device_id = ?",
                rows,
            )

    def change_states(
        self, name: str, only_from: str, changes: Iterable[tuple[str, str, int | None, str | None]]
    ) -> list[str]:
        """`set_states` for devices still in state `only_from` when written (another process may
        have moved them since they were read); the devices changed."""
        now = time.time()
        changed: list[str] = []
        with self._write() as conn:
            for device, state, version, reason in changes:
                if conn.execute(
                    "UPDATE fleet_rollout_devices SET state = ?, desired_version = ?, reason = ?, updated_at = ? "
                    "WHERE rollout = ? AND device_id = ? AND state = ?",
                    (state, version, reason, now, name, device, only_from),
                ).rowcount:
                    changed.append(device)
        return changed

    def mark_issuing(self, name: str, previous: Mapping[str, ModelVersionRef | None]) -> None:
        """Remember each device's previous desired state, before ours is published."""
        now = time.time()
        encoded: dict[ModelVersionRef, str] = {}
        rows = []
        for device, ref in previous.items():
            raw = None
            if ref is not None:
                raw = encoded.get(ref)
                if raw is None:
                    raw = encoded[ref] = json.dumps(ref.to_dict())
            rows.append((raw, now, name, device))
        with self._write() as conn:
            conn.executemany(
                "UPDATE fleet_rollout_devices SET state = 'issuing', previous = ?, updated_at = ? "
                "WHERE rollout = ? AND device_id = ? AND state = 'waiting'",
                rows,
            )

    def update_devices(self, devices: Iterable[RolloutDevice]) -> None:
        now = time.time()
        rows = [
            (
                d.state,
                d.desired_version,
                json.dumps(d.previous.to_dict()) if d.previous else None,
                d.reason,
                int(d.confirmed),
                now,
                d.rollout,
                d.device_id,
            )
            for d in devices
        ]
        if not rows:
            return
        with self._write() as conn:
            conn.executemany(
                "UPDATE fleet_rollout_devices SET state = ?, desired_version = ?, previous = ?, reason = ?, "
                "confirmed = ?, updated_at = ? WHERE rollout = ? AND device_id = ?",
                rows,
            )

    def stage_counts(self, name: str, stage: int) -> dict[str, int]:
        """How many of a stage's devices are in each state."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT state, COUNT(*) AS n FROM fleet_rollout_devices WHERE rollout = ? AND stage = ? "
                "GROUP BY state",
                (name, stage),
            ).fetchall()
        return {r["state"]: r["n"] for r in rows}

    def first_device(self, name: str, stage: int, states: Sequence[str]) -> RolloutDevice | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT * FROM fleet_rollout_devices WHERE rollout = ? AND stage = ? "
                f"AND state IN ({','.join('?' * len(states))}) ORDER BY position LIMIT 1",
                (name, stage, *states),
            ).fetchone()
        return _row_device(row) if row else None

    def device_ids(self, name: str, stage: int, states: Sequence[str]) -> list[str]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT device_id FROM fleet_rollout_devices WHERE rollout = ? AND stage = ? "
                f"AND state IN ({','.join('?' * len(states))})",
                (name, stage, *states),
            ).fetchall()
        return [r[0] for r in rows]

    def timed_out(self, name: str) -> dict[str, tuple[int | None, str | None]]:
        """The rollout's devices in state `timeout`: device -> (desired `$version`, reason)."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT device_id, desired_version, reason FROM fleet_rollout_devices "
                "WHERE rollout = ? AND state = 'timeout' ORDER BY position",
                (name,),
            ).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def counts(self, name: str) -> dict[int, dict[str, int]]:
        """Per stage, how many devices are in each state."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT stage, state, COUNT(*) AS n FROM fleet_rollout_devices WHERE rollout = ? "
                "GROUP BY stage, state",
                (name,),
            ).fetchall()
        out: dict[int, dict[str, int]] = {}
        for r in rows:
            out.setdefault(r["stage"], {})[r["state"]] = r["n"]
        return out

    # ------------------------------------------------------------------ tags

    def tags(self) -> dict[str, dict[str, str]]:
        with self._connect() as conn:
            rows = conn.execute("SELECT device_id, key, value FROM fleet_tags").fetchall()
        out: dict[str, dict[str, str]] = {}
        for r in rows:
            out.setdefault(r["device_id"], {})[r["key"]] = r["value"]
        return out

    def set_tags(self, device_id: str, tags: Mapping[str, str | None]) -> None:
        with self._write() as conn:
            for key, value in tags.items():
                if value is None:
                    conn.execute("DELETE FROM fleet_tags WHERE device_id = ? AND key = ?", (device_id, key))
                else:
                    conn.execute(
                        "INSERT INTO fleet_tags VALUES (?, ?, ?) "
                        "ON CONFLICT (device_id, key) DO UPDATE SET value = excluded.value",
                        (device_id, key, value),
                    )
