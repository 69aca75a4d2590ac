"""The agent's typed configuration: defaults, then a TOML file, then `MODELFLEET_AGENT_*` env vars.

A TOML key `[broker] port = 1883` is the field `broker_port` and the env var
`MODELFLEET_AGENT_BROKER_PORT`. Every value is validated at start; an error
names the field as `section.key`.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .protocol import DEFAULT_PREFIX, check_device_id

ENV_PREFIX = "MODELFLEET_AGENT_"
SECTIONS = ("device", "broker", "store", "scoring", "telemetry", "reconcile", "commands", "log")


@dataclass(frozen=True)
class AgentConfig:
    """Everything `modelfleet-agent run` needs."""

    device_id: str = ""
    #: declared in the birth message; fleet rollouts target devices by them
    device_tags: dict[str, Any] = field(default_factory=dict)
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    broker_username: str = ""  # default: the device id
    broker_password: str = ""
    broker_password_file: Path | None = None
    broker_prefix: str = DEFAULT_PREFIX
    broker_keepalive_s: int = 30
    broker_tls: bool = False
    broker_ca_file: Path | None = None
    store_dir: Path = Path("/var/lib/modelfleet-agent")
    store_reserve_mb: int = 64
    store_token: str = ""
    store_token_file: Path | None = None
    store_trusted_keys: list[Path] = field(default_factory=list)
    store_download_limit_bps: int = 0
    store_timeout_s: float = 30.0
    #: file:// artifact URLs read local files: off unless a fleet serves artifacts from a shared mount
    store_allow_file_urls: bool = False
    scoring_host: str = "127.0.0.1"
    scoring_port: int = 5001
    scoring_keys_file: Path | None = None
    telemetry_interval_s: float = 10.0
    telemetry_queue_max_bytes: int = 4 * 1024 * 1024
    telemetry_queue_max_records: int = 10_000
    telemetry_batch_max: int = 50
    reconcile_retry_initial_s: float = 1.0
    reconcile_retry_max_s: float = 60.0
    #: a command issued longer ago than this (queued while the device was offline) is answered
    #: `expired` instead of carried out; 0 = no limit
    commands_max_age_s: float = 600.0
    log_level: str = "INFO"

    @property
    def username(self) -> str:
        return self.broker_username or self.device_id

    def password(self) -> str | None:
        if self.broker_password_file is not None:
            return _read_secret(self.broker_password_file, "broker.password_file")
        return self.broker_password or None

    def token(self) -> str | None:
        if self.store_token_file is not None:
            return _read_secret(self.store_token_file, "store.token_file")
        return self.store_token or None

    def validated(self) -> AgentConfig:
        if not self.device_id:
            raise ConfigError("device.id", "is required (the device id, also its MQTT user name)")
        try:
            check_device_id(self.device_id)
        except Exception as exc:
            raise ConfigError("device.id", str(exc)) from None
        for name in ("broker_port", "scoring_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ConfigError(_dotted(name), f"must be 0-65535, got {value}")
        positive = ("telemetry_interval_s", "reconcile_retry_initial_s", "reconcile_retry_max_s",
                    "telemetry_queue_max_bytes", "telemetry_queue_max_records", "telemetry_batch_max",
                    "broker_keepalive_s", "store_timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(_dotted(name), f"must be positive, got {getattr(self, name)}")
        for name in ("store_reserve_mb", "store_download_limit_bps", "commands_max_age_s"):
            if getattr(self, name) < 0:
                raise ConfigError(_dotted(name), f"must be >= 0, got {getattr(self, name)}")
        for name in ("broker_password_file", "store_token_file", "scoring_keys_file", "broker_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(_dotted(name), f"file not found: {path}")
        for key in self.store_trusted_keys:
            if not key.is_file():
                raise ConfigError("store.trusted_keys", f"file not found: {key}")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError("log.level", f"must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        return self


_FIELDS = {f.name: f for f in fields(AgentConfig)}


def _dotted(name: str) -> str:
    section, _, key = name.partition("_")
    return f"{section}.{key}"


def _read_secret(path: Path, what: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(what, f"cannot read {path}: {exc.strerror or exc}") from None


def _convert(name: str, raw: Any, source: str) -> Any:
    kind = str(_FIELDS[name].type)
    where = f"{_dotted(name)} (from {source})"
    try:
        if kind == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError
        if kind == "Path":
            return Path(str(raw)).expanduser()
        if kind == "Path | None":
            return Path(str(raw)).expanduser() if str(raw) else None
        if kind == "dict[str, Any]":
            value = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(value, dict):
                raise ValueError
            return value
        if kind == "list[Path]":
            items = raw if isinstance(raw, list) else [p for p in str(raw).split(",") if p.strip()]
            return [Path(str(p).strip()).expanduser() for p in items]
        if not isinstance(raw, str | int | float):
            raise ValueError
        return str(raw)
    except (TypeError, ValueError):
        expected = "a table (or a JSON object in env)" if kind.startswith("dict") else kind.replace(" | None", "")
        raise ConfigError(where, f"expected {expected}, got {raw!r}") from None


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Defaults, then the TOML file at `path`, then env vars; validated."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
        for section, table in data.items():
            if section not in SECTIONS:
                raise ConfigError(section, f"unknown section in {path} (known: {', '.join(SECTIONS)})")
            if not isinstance(table, dict):
                raise ConfigError(section, f"must be a table ([{section}] with keys below it) in {path}, got {table!r}")
            for key, raw in table.items():
                name = f"{section}_{key}"
                if name not in _FIELDS:
                    raise ConfigError(f"{section}.{key}", f"unknown key in {path}")
                values[name] = _convert(name, raw, str(path))
    environ = os.environ if env is None else env
    for name in _FIELDS:
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            values[name] = _convert(name, environ[env_name], env_name)
    return replace(AgentConfig(), **values).validated()
