"""The model registry: SQLite metadata beside content-addressed blobs.

SQLite runs in WAL mode; a version is allocated and inserted inside one
`BEGIN IMMEDIATE` transaction, so concurrent `register` calls serialise on
the write lock and get distinct versions. The blob is stored first and the
row inserted last: a killed register leaves no version pointing at missing
or partial bytes. Deployed services are recorded in the same database.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfleet.agent.modelref import ModelVersionRef
from modelfleet.deployer import sqlitedb
from modelfleet.deployer.errors import (
    DeployerError,
    ModelInUseError,
    ModelNotFoundError,
    RegistryError,
    ServiceBusyError,
    ServiceExistsError,
    ServiceNotFoundError,
)
from modelfleet.deployer.home import modelfleet_home
from modelfleet.deployer.registry.artifacts import ArtifactFormat, BlobStore
from modelfleet.deployer.registry.locks import (
    STATE_OF_OPERATION,
    OperationName,
    ProcessIdentity,
    ServiceOperation,
)
from modelfleet.deployer.targets.base import ModelBinding, ServiceRecord, ServiceState

if TYPE_CHECKING:
    from modelfleet.deployer.registry.signing import Signature

FRAMEWORKS = ("onnx", "tflite", "sklearn", "custom")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    format TEXT NOT NULL,
    filename TEXT NOT NULL,
    framework TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '{}',
    properties TEXT NOT NULL DEFAULT '{}',
    signature TEXT,
    key_id TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS models_sha256 ON models (sha256);
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    scoring_uri TEXT,
    swagger_uri TEXT,
    models TEXT NOT NULL DEFAULT '[]',
    target_data TEXT NOT NULL DEFAULT '{}',
    config TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""
# The owner of the operation running on a service (see registry/locks.py); added
# to registries created before operations had owners by `_migrate`.
_OPERATION_COLUMNS = {
    "op": "TEXT",
    "op_pid": "INTEGER",
    "op_pid_start": "INTEGER",
    "op_host": "TEXT",
    "op_started_at": "REAL",
    "op_models": "TEXT",
}
_CLEAR_OPERATION = (
    "op = NULL, op_pid = NULL, op_pid_start = NULL, op_host = NULL, op_started_at = NULL,"
    " op_models = NULL"
)
_TRANSITIONAL_STATE = {"deploy": "creating", "update": "updating", "delete": "deleting"}


@dataclass(frozen=True)
class ModelVersion:
    """One registered model version."""

    name: str
    version: int
    sha256: str
    size: int
    format: ArtifactFormat
    filename: str
    framework: str
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)
    signature: str | None = None
    key_id: str | None = None
    created_at: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "id": self.key,
            "sha256": self.sha256,
            "size": self.size,
            "format": self.format,
            "filename": self.filename,
            "framework": self.framework,
            "description": self.description,
            "tags": self.tags,
            "properties": self.properties,
            "signature": self.signature,
            "key_id": self.key_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_at)),
        }


@dataclass(frozen=True)
class RegisterResult:
    model: ModelVersion
    created: bool  # False: identical bytes were already registered under this name
    signature_added: bool = False  # the existing version was unsigned and is now signed


def guess_framework(path: Path) -> str:
    candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    suffixes = {p.suffix.lower() for p in candidates}
    if ".onnx" in suffixes:
        return "onnx"
    if ".tflite" in suffixes:
        return "tflite"
    if suffixes & {".pkl", ".joblib", ".pickle"}:
        return "sklearn"
    return "custom"


def parse_model_id(text: str, *, require_version: bool = False) -> tuple[str, int | None]:
    """`NAME[:VERSION]` as users write it."""
    name, sep, version = text.partition(":")
    if not name:
        raise RegistryError(f"invalid model reference {text!r}", hint="write NAME:VERSION")
    if not sep or version in ("", "latest"):
        if require_version and not sep:
            raise RegistryError(
                f"model reference {text!r} needs a version", hint="write NAME:VERSION, e.g. digits:1"
            )
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise RegistryError(
            f"invalid version {version!r} in {text!r}", hint="versions are integers from 1"
        )
    return name, int(version)


def _row_to_model(row: sqlite3.Row) -> ModelVersion:
    return ModelVersion(
        name=row["name"],
        version=row["version"],
        sha256=row["sha256"],
        size=row["size"],
        format=row["format"],
        filename=row["filename"],
        framework=row["framework"],
        description=row["description"],
        tags=json.loads(row["tags"]),
        properties=json.loads(row["properties"]),
        signature=row["signature"],
        key_id=row["key_id"],
        created_at=row["created_at"],
    )


def _row_to_operation(row: sqlite3.Row) -> ServiceOperation | None:
    """The operation a service row says is running (None: none)."""
    if row["op"] is None:
        legacy = STATE_OF_OPERATION.get(row["state"])
        if legacy is None:
            return None
        return ServiceOperation(legacy, None, row["updated_at"])
    owner = ProcessIdentity(row["op_pid"], row["op_pid_start"], row["op_host"])
    models = tuple(json.loads(row["op_models"] or "[]"))
    return ServiceOperation(row["op"], owner, row["op_started_at"], models)


def _find_model(conn: sqlite3.Connection, name: str, version: int | None) -> ModelVersion:
    """A version (the latest when `version` is None), or ModelNotFoundError naming the versions."""
    if version is None:
        row = conn.execute(
            "SELECT * FROM models WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
        ).fetchone()
    else:
        row = conn.execute(
            "SELECT * FROM models WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
    if row is not None:
        return _row_to_model(row)
    versions = [
        r[0] for r in conn.execute("SELECT version FROM models WHERE name = ? ORDER BY version", (name,))
    ]
    if not versions:
        raise ModelNotFoundError(f"model {name!r} is not registered")
    raise ModelNotFoundError(
        f"model {name!r} has no version {version}",
        hint=f"registered versions: {', '.join(map(str, versions))}",
    )


def _services_using(conn: sqlite3.Connection, key: str) -> list[str]:
    """Services whose models, or whose running (or interrupted) operation's models, include `key`."""
    rows = conn.execute("SELECT name, models, op_models FROM services ORDER BY name").fetchall()
    return [
        r["name"]
        for r in rows
        if key in json.loads(r["models"]) or key in json.loads(r["op_models"] or "[]")
    ]


def _check_models_exist(conn: sqlite3.Connection, models: Sequence[str]) -> None:
    """Inside the write transaction that records `models` as used: none can be deleted meanwhile."""
    for key in models:
        name, version = parse_model_id(key)
        found = conn.execute(
            "SELECT 1 FROM models WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        if found is None:
            raise ModelNotFoundError(f"model {key} is not registered (was it just deleted?)")


def _row_to_service(row: sqlite3.Row) -> ServiceRecord:
    return ServiceRecord(
        name=row["name"],
        target=row["target"],
        state=row["state"],
        scoring_uri=row["scoring_uri"],
        swagger_uri=row["swagger_uri"],
        models=json.loads(row["models"]),
        target_data=json.loads(row["target_data"]),
    )


class Registry:
    """Models and services under one `$MODELFLEET_HOME`."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = home if home is not None else modelfleet_home()
        self.blobs = BlobStore(self.home)
        self.db_path = self.home / "registry.db"
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            with self._connect() as conn:
                conn.executescript(_SCHEMA)
                self._migrate(conn)
        except OSError as exc:
            raise RegistryError(
                f"cannot open the registry at {self.home}: {exc}",
                hint="set MODELFLEET_HOME to a writable folder",
            ) from exc

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlitedb.connect(self.db_path)
        except sqlite3.Error as exc:
            raise RegistryError(
                f"cannot open the registry database {self.db_path}: {exc}",
                hint="set MODELFLEET_HOME to a writable folder",
            ) from exc
        try:
            sqlitedb.set_pragmas(conn, synchronous="FULL")
            yield conn
        except sqlite3.OperationalError as exc:
            # "database is locked" after the busy timeout, a full disk, a read-only home
            raise RegistryError(
                f"registry database {self.db_path}: {exc}",
                hint="another modelfleet command may hold it; retry, or check disk space",
            ) from exc
        except sqlite3.DatabaseError as exc:
            # "file is not a database", a corrupt page: retrying cannot help
            raise RegistryError(
                f"registry database {self.db_path} is unreadable: {exc}",
                hint=f"restore it from a backup, or move it away to start an empty registry "
                f"(model bytes stay in {self.blobs.blobs})",
            ) from exc
        finally:
            conn.close()

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Add the operation columns to a registry created before they existed."""

        def missing() -> list[str]:
            have = {r["name"] for r in conn.execute("PRAGMA table_info(services)")}
            return [c for c in _OPERATION_COLUMNS if c not in have]

        if not missing():
            return
        with sqlitedb.write_transaction(conn):
            for column in missing():  # again under the lock: another CLI may have just added them
                conn.execute(f"ALTER TABLE services ADD COLUMN {column} {_OPERATION_COLUMNS[column]}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front (no upgrade deadlocks)."""
        with self._connect() as conn, sqlitedb.write_transaction(conn) as tx:
            yield tx

    # ------------------------------------------------------------------ models

    def register(
        self,
        name: str,
        path: Path,
        *,
        tags: Mapping[str, str] | None = None,
        properties: Mapping[str, str] | None = None,
        description: str = "",
        framework: str | None = None,
        sign_key: Path | None = None,
    ) -> RegisterResult:
        if not _NAME.match(name):
            raise RegistryError(
                f"invalid model name {name!r}",
                hint="use letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        if framework is not None and framework not in FRAMEWORKS:
            raise RegistryError(
                f"unknown framework {framework!r}", hint=f"use one of: {', '.join(FRAMEWORKS)}"
            )
        # cryptography is imported only when signing: it is a slow import for every CLI call.
        from modelfleet.deployer.registry import signing

        key = signing.load_private_key(sign_key) if sign_key is not None else None
        stored = self.blobs.put(path)
        signature = signing.sign_digest(key, stored.sha256) if key is not None else None
        now = time.time()
        with self._write() as conn:
            same = conn.execute(
                "SELECT * FROM models WHERE name = ? AND sha256 = ? ORDER BY version LIMIT 1",
                (name, stored.sha256),
            ).fetchone()
            if same is not None:
                return self._sign_existing(conn, _row_to_model(same), signature)
            if not self.blobs.exists(stored.sha256):
                # A concurrent delete of the last version with these bytes removed
                # the blob after we stored it; store it again under the lock.
                self.blobs.put(path)
            (latest,) = conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM models WHERE name = ?", (name,)
            ).fetchone()
            model = ModelVersion(
                name=name,
                version=int(latest) + 1,
                sha256=stored.sha256,
                size=stored.size,
                format=stored.format,
                filename=stored.filename,
                framework=framework or guess_framework(path),
                description=description,
                tags=dict(tags or {}),
                properties=dict(properties or {}),
                signature=signature.signature if signature else None,
                key_id=signature.key_id if signature else None,
                created_at=now,
            )
            conn.execute(
                "INSERT INTO models (name, version, sha256, size, format, filename, framework,"
                " description, tags, properties, signature, key_id, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    model.name,
                    model.version,
                    model.sha256,
                    model.size,
                    model.format,
                    model.filename,
                    model.framework,
                    model.description,
                    json.dumps(model.tags, sort_keys=True),
                    json.dumps(model.properties, sort_keys=True),
                    model.signature,
                    model.key_id,
                    model.created_at,
                ),
            )
        return RegisterResult(model, created=True)

    @staticmethod
    def _sign_existing(
        conn: sqlite3.Connection, model: ModelVersion, signature: Signature | None
    ) -> RegisterResult:
        """Identical bytes registered again: add the signature to the existing version.

        The signature is over the artifact digest, so it is as valid for the existing
        version as for a new one. A version carries one signature (contract section 4:
        the `ModelVersionRef` has one `signature` and `key_id`), so a different key is
        refused rather than replacing the signature devices may already trust.
        """
        if signature is None or model.key_id == signature.key_id:
            return RegisterResult(model, created=False)
        if model.signature is not None:
            raise RegistryError(
                f"identical bytes are already registered as {model.key}, signed by key "
                f"{model.key_id}; a version carries one signature, so key {signature.key_id} "
                "cannot be added",
                hint=f"devices that trust key {model.key_id} verify it as it is; to sign with "
                f"the new key, `modelfleet model delete {model.key}` and register again",
            )
        conn.execute(
            "UPDATE models SET signature = ?, key_id = ? WHERE name = ? AND version = ?",
            (signature.signature, signature.key_id, model.name, model.version),
        )
        signed = replace(model, signature=signature.signature, key_id=signature.key_id)
        return RegisterResult(signed, created=False, signature_added=True)

    def list_models(
        self, *, name: str | None = None, tags: Mapping[str, str] | None = None
    ) -> list[ModelVersion]:
        with self._connect() as conn:
            if name is None:
                rows = conn.execute("SELECT * FROM models ORDER BY name, version").fetchall()
            else:
                rows = conn.execute(
                    "SELECT * FROM models WHERE name = ? ORDER BY version", (name,)
                ).fetchall()
        models = [_row_to_model(r) for r in rows]
        for k, v in (tags or {}).items():
            models = [m for m in models if m.tags.get(k) == v]
        return models

    def get_model(self, name: str, version: int | None = None) -> ModelVersion:
        """A version, or the latest one when `version` is None."""
        with self._connect() as conn:
            return _find_model(conn, name, version)

    def resolve(self, text: str) -> ModelVersion:
        name, version = parse_model_id(text)
        return self.get_model(name, version)

    def binding(self, model: ModelVersion) -> ModelBinding:
        """The model as a deployment target sees it: a local, read-only path."""
        path = self.blobs.materialise(model.sha256, model.format, model.filename)
        return ModelBinding(
            name=model.name,
            version=model.version,
            path=path,
            sha256=model.sha256,
            framework=model.framework,
        )

    def services_using(self, model: ModelVersion) -> list[str]:
        """Services serving `model`, or putting it in place (a deploy or update in progress)."""
        with self._connect() as conn:
            return _services_using(conn, model.key)

    def delete_model(self, name: str, version: int, *, force: bool = False) -> ModelVersion:
        # One write transaction from the in-use check to the removal: a deploy or
        # update records the models it uses under the same lock, so it either sees
        # this version gone or this sees it used.
        with self._write() as conn:
            model = _find_model(conn, name, version)
            users = _services_using(conn, model.key)
            if users and not force:
                raise ModelInUseError(
                    f"model {model.key} is used by service(s) {', '.join(users)}",
                )
            conn.execute("DELETE FROM models WHERE name = ? AND version = ?", (name, version))
            (others,) = conn.execute(
                "SELECT COUNT(*) FROM models WHERE sha256 = ?", (model.sha256,)
            ).fetchone()
            # Inside the write lock, so a concurrent register of the same bytes
            # cannot insert a row between the count and the removal.
            if others == 0:
                if users:
                    self.blobs.path(model.sha256).unlink(missing_ok=True)
                else:
                    self.blobs.remove(model.sha256)
        return model

    def model_ref(self, model: ModelVersion, base_url: str) -> ModelVersionRef:
        """The contract's `ModelVersionRef`, with the artifact URL on `base_url`."""
        return ModelVersionRef(
            name=model.name,
            version=model.version,
            url=f"{base_url.rstrip('/')}/v1/artifacts/{model.sha256}",
            sha256=model.sha256,
            size=model.size,
            format=model.format,
            filename=model.filename,
            framework=model.framework,
            signature=model.signature,
            key_id=model.key_id,
        )

    # ------------------------------------------------------------------ services
    #
    # A service row carries the operation running on it (deploy, update, delete)
    # and the process that owns it, set and checked inside one `BEGIN IMMEDIATE`
    # transaction: a second operation is refused while the owner lives, and may
    # take over once it died (a killed CLI).

    def reserve_service(
        self,
        name: str,
        target: str,
        config: Mapping[str, Any],
        *,
        models: Sequence[str] = (),
        target_data: Mapping[str, Any] | None = None,
    ) -> ServiceRecord | None:
        """Claim a service name ("creating", owned by this process); fails if it is taken.

        `models` are checked to exist in the same transaction, so a concurrent
        `model delete` either sees them used or makes this fail. Returns the record
        of an interrupted earlier deploy of the same name that this one took over
        (its leftovers are the caller's to clean up), else None.
        """
        now = time.time()
        me = ProcessIdentity.current()
        with self._write() as conn:
            _check_models_exist(conn, models)
            row = conn.execute("SELECT * FROM services WHERE name = ?", (name,)).fetchone()
            stale: ServiceRecord | None = None
            if row is not None:
                running = _row_to_operation(row)
                if running is not None and running.is_alive():
                    raise ServiceBusyError(running.busy_message(name), hint=running.busy_hint(name))
                if running is None or running.name != "deploy":
                    state = row["state"] if running is None else "failed"
                    raise ServiceExistsError(f"service {name!r} already exists (state {state})")
                stale = _row_to_service(row)
                conn.execute("DELETE FROM services WHERE name = ?", (name,))
            conn.execute(
                "INSERT INTO services (name, target, state, models, target_data, config,"
                " created_at, updated_at, op, op_pid, op_pid_start, op_host, op_started_at,"
                " op_models) VALUES (?, ?, 'creating', ?, ?, ?, ?, ?, 'deploy', ?, ?, ?, ?, ?)",
                (
                    name,
                    target,
                    json.dumps(list(models)),
                    json.dumps(dict(target_data or {})),
                    json.dumps(config),
                    now,
                    now,
                    me.pid,
                    me.start_ticks,
                    me.host,
                    now,
                    json.dumps(list(models)),
                ),
            )
        return stale

    def begin_operation(
        self,
        name: str,
        operation: OperationName,
        *,
        models: Sequence[str] = (),
        take_over_remote: bool = False,
    ) -> tuple[ServiceRecord, ServiceOperation | None]:
        """Take the service's operation lock for this process, or raise ServiceBusyError.

        Returns the record as it was and the interrupted operation taken over
        (its owner died), if any. `models` (those an update puts in place) count
        as used from now on, checked to exist in the same transaction.
        `take_over_remote` also takes a lock held on another host, whose
        liveness cannot be checked from here.
        """
        now = time.time()
        me = ProcessIdentity.current()
        with self._write() as conn:
            row = conn.execute("SELECT * FROM services WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise ServiceNotFoundError(f"service {name!r} does not exist")
            running = _row_to_operation(row)
            remote = running is not None and running.owner is not None and running.owner.is_remote()
            if running is not None and running.is_alive() and not (remote and take_over_remote):
                raise ServiceBusyError(running.busy_message(name), hint=running.busy_hint(name))
            if running is not None and running.name == "deploy" and operation == "update":
                raise DeployerError(
                    f"service {name!r} was never fully deployed ({running.interrupted_detail()})",
                    hint=f"deploy it again, or delete it (modelfleet service delete {name})",
                )
            _check_models_exist(conn, models)
            conn.execute(
                "UPDATE services SET state = ?, updated_at = ?, op = ?, op_pid = ?,"
                " op_pid_start = ?, op_host = ?, op_started_at = ?, op_models = ? WHERE name = ?",
                (
                    _TRANSITIONAL_STATE[operation],
                    now,
                    operation,
                    me.pid,
                    me.start_ticks,
                    me.host,
                    now,
                    json.dumps(list(models)),
                    name,
                ),
            )
        record = _row_to_service(row)
        if running is not None:  # its state is the dead operation's, not the service's
            record = replace(record, state="failed")
        return record, running

    def end_operation(self, name: str, state: ServiceState) -> None:
        """Release this process's operation lock, leaving the service in `state`."""
        me = ProcessIdentity.current()
        with self._write() as conn:
            conn.execute(
                f"UPDATE services SET state = ?, updated_at = ?, {_CLEAR_OPERATION}"
                " WHERE name = ? AND op_pid = ? AND op_host = ?",
                (state, time.time(), name, me.pid, me.host),
            )

    def save_service(self, record: ServiceRecord, config: Mapping[str, Any] | None = None) -> None:
        """Store the outcome of a deploy or update; ends the operation running on it."""
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE services SET target = ?, state = ?, scoring_uri = ?, swagger_uri = ?,"
                f" models = ?, target_data = ?, updated_at = ?, {_CLEAR_OPERATION} WHERE name = ?",
                (
                    record.target,
                    record.state,
                    record.scoring_uri,
                    record.swagger_uri,
                    json.dumps(record.models),
                    json.dumps(record.target_data),
                    now,
                    record.name,
                ),
            )
            if cur.rowcount == 0:
                raise ServiceNotFoundError(f"service {record.name!r} does not exist")
            if config is not None:
                conn.execute(
                    "UPDATE services SET config = ? WHERE name = ?",
                    (json.dumps(config), record.name),
                )

    def set_service_state(self, name: str, state: str, *, was: str | None = None) -> bool:
        """Record a probed state; never over an operation in progress (nor over a
        state other than `was`, when given). True if the row changed."""
        query = "UPDATE services SET state = ?, updated_at = ? WHERE name = ? AND op IS NULL"
        args: list[Any] = [state, time.time(), name]
        if was is not None:
            query += " AND state = ?"
            args.append(was)
        with self._write() as conn:
            return conn.execute(query, args).rowcount > 0

    def get_service(self, name: str) -> ServiceRecord:
        return self.get_service_operation(name)[0]

    def get_service_operation(self, name: str) -> tuple[ServiceRecord, ServiceOperation | None]:
        """The service and the operation running on it (or interrupted), if any."""
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM services WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ServiceNotFoundError(f"service {name!r} does not exist")
        return _row_to_service(row), _row_to_operation(row)

    def service_config(self, name: str) -> dict[str, Any]:
        with self._connect() as conn:
            row = conn.execute("SELECT config FROM services WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ServiceNotFoundError(f"service {name!r} does not exist")
        config: dict[str, Any] = json.loads(row[0])
        return config

    def list_services(self) -> list[ServiceRecord]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM services ORDER BY name").fetchall()
        return [_row_to_service(r) for r in rows]

    def forget_service(self, name: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM services WHERE name = ?", (name,))

    def service_workdir(self, name: str) -> Path:
        return self.home / "services" / name
