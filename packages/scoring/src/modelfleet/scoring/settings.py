"""Typed settings of the scoring server: defaults, then a TOML file, then env vars, then flags.

Every value is validated at start; an error names the field (flag and env var).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ServerSettings:
    """Everything `serve` and `ScoringServer` need; field names match flags and env vars."""

    host: str = "127.0.0.1"
    port: int = 5001
    workers: int = 1
    model_dir: Path | None = None
    entry_script: str | None = None
    model_name: str = "model"
    model_version: str = "1"
    keys_file: Path | None = None
    admin_key_file: Path | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    scoring_timeout_ms: int = 60_000
    #: requests scored at once in the thread pool (slow models); 0 = one per CPU
    max_concurrent_requests: int = 0
    #: requests allowed to wait for a slot before 503; 0 = max(32, 4 x max_concurrent_requests)
    max_queued_requests: int = 0
    #: models whose warm-up median is below this run inline on the event loop
    inline_threshold_ms: float = 1.0
    #: idle keep-alive connections (and requests sent too slowly) are closed after this
    keep_alive_s: float = 75.0
    #: a load (import, init(), warm-up) running longer is refused with stage "timeout"
    load_timeout_s: float = 300.0
    log_level: str = "INFO"

    @property
    def concurrency(self) -> int:
        return self.max_concurrent_requests or _cpus()

    @property
    def queue_limit(self) -> int:
        return self.max_queued_requests or max(32, 4 * self.concurrency)

    def validated(self) -> ServerSettings:
        """Check ranges and paths; raise ConfigError naming the field."""
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"must be 0-65535, got {self.port}")
        if self.workers < 1:
            raise ConfigError("workers", f"must be at least 1, got {self.workers}")
        if self.max_body_bytes < 1:
            raise ConfigError("max_body_bytes", f"must be positive, got {self.max_body_bytes}")
        if self.scoring_timeout_ms < 1:
            raise ConfigError("scoring_timeout_ms", f"must be positive, got {self.scoring_timeout_ms}")
        if self.max_concurrent_requests < 0:
            raise ConfigError("max_concurrent_requests", f"must be >= 0, got {self.max_concurrent_requests}")
        if self.max_queued_requests < 0:
            raise ConfigError("max_queued_requests", f"must be >= 0, got {self.max_queued_requests}")
        if self.inline_threshold_ms < 0:
            raise ConfigError("inline_threshold_ms", f"must be >= 0, got {self.inline_threshold_ms}")
        if self.model_dir is not None and not self.model_dir.exists():
            raise ConfigError("model_dir", f"does not exist: {self.model_dir}")
        for name in ("keys_file", "admin_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(name, f"file not found: {path}")
        if self.keep_alive_s <= 0:
            raise ConfigError("keep_alive_s", f"must be positive, got {self.keep_alive_s}")
        if self.load_timeout_s <= 0:
            raise ConfigError("load_timeout_s", f"must be positive, got {self.load_timeout_s}")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError("log_level", f"must be DEBUG, INFO, WARNING or ERROR, got {self.log_level}")
        return self


_FIELDS = {f.name: f for f in fields(ServerSettings)}
# Azure ML's names, honoured so an Azure ML container's environment works unchanged
_ALIASES = {"model_dir": "AZUREML_MODEL_DIR", "entry_script": "AZUREML_ENTRY_SCRIPT"}


def env_name(name: str) -> str:
    return "MODELFLEET_" + name.upper()


def _convert(name: str, raw: Any, source: str) -> Any:
    kind = str(_FIELDS[name].type)
    try:
        if isinstance(raw, bool) and ("int" in kind or "float" in kind):
            raise TypeError  # TOML `workers = true` is not 1
        if "int" in kind and "Path" not in kind:
            value = int(raw)
            return value
        if "float" in kind:
            return float(raw)
        if "Path" in kind:
            return Path(str(raw)) if str(raw) else None
        return None if raw is None else str(raw)
    except (TypeError, ValueError):
        wanted = "an integer" if "int" in kind else "a number"
        raise ConfigError(name, f"{source} must be {wanted}, got {raw!r}") from None


def load_settings(
    flags: dict[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    environ: dict[str, str] | None = None,
) -> ServerSettings:
    """Build settings from file, then env (MODELFLEET_*, AZUREML_* aliases), then flags (non-None)."""
    env = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    config_file = config_file or (Path(env["MODELFLEET_CONFIG"]) if env.get("MODELFLEET_CONFIG") else None)
    if config_file is not None:
        import tomllib  # only with a config file: its regexes cost ~0.6 MiB and 3 ms at start

        try:
            data = tomllib.loads(config_file.read_text())
        except FileNotFoundError:
            raise ConfigError("config", f"file not found: {config_file}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{config_file} is not valid TOML: {exc}") from None
        data = data.get("serve", data)
        for key, raw in data.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise ConfigError(key, f"unknown setting in {config_file}")
            values[name] = _convert(name, raw, f"{key} in {config_file}")
    for name in _FIELDS:
        for var in (_ALIASES.get(name), env_name(name)):
            if var and env.get(var, "") != "":
                values[name] = _convert(name, env[var], f"env {var}")
    for name, raw in (flags or {}).items():
        if raw is not None:
            values[name] = _convert(name, raw, "--" + name.replace("_", "-"))
    return replace(ServerSettings(), **values).validated()
