"""Bearer keys: a primary and a secondary key, re-read from their file without a restart."""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path

import orjson

from .errors import ConfigError

log = logging.getLogger("modelfleet.scoring.auth")


class KeyRing:
    """Valid keys for one purpose (scoring or admin); empty means no auth required.

    A keys file is JSON `{"primary": "...", "secondary": "..."}` (or, for the
    admin key, a file holding one token). It is re-checked at most once a second
    by mtime, and on `reload()` (SIGHUP). A file that fails to parse keeps the
    previous keys: a half-written rotation must never lock everyone out.
    """

    def __init__(self, path: Path | None = None, *, single_token: bool = False) -> None:
        self.path = path
        self.single_token = single_token
        self._keys: tuple[bytes, ...] = ()
        self._mtime_ns = -1
        self._next_check = 0.0
        self.enabled = path is not None
        if path is not None:
            self._keys = self._read(path)
            self._mtime_ns = path.stat().st_mtime_ns

    def set_keys(self, *keys: str | None) -> None:
        """Replace the keys in memory (an empty set disables auth unless a file is configured)."""
        self._keys = tuple(k.encode() for k in keys if k)
        self.enabled = bool(self._keys) or self.path is not None

    def reload(self) -> bool:
        """Re-read the keys file now; True when the keys changed."""
        if self.path is None:
            return False
        try:
            mtime = self.path.stat().st_mtime_ns
            keys = self._read(self.path)
        except (OSError, ConfigError) as exc:
            log.warning("event=keys_reload_failed file=%s reason=%r", self.path, str(exc))
            return False
        self._mtime_ns = mtime
        changed = keys != self._keys
        self._keys = keys
        if changed:
            log.info("event=keys_reloaded file=%s count=%d", self.path, len(keys))
        return changed

    def check(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries a valid key (constant-time comparison)."""
        if not self.enabled:
            return True
        if self.path is not None:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + 1.0
                try:
                    if self.path.stat().st_mtime_ns != self._mtime_ns:
                        self.reload()
                except OSError:
                    pass
        if not authorization or authorization[:7].lower() != "bearer ":
            return False
        given = authorization[7:].strip().encode()
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        return ok

    def _read(self, path: Path) -> tuple[bytes, ...]:
        field = "admin_key_file" if self.single_token else "keys_file"
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(field, f"cannot read {path}: {exc.strerror}") from None
        if self.single_token:
            token = text.strip()
            if not token:
                raise ConfigError(field, f"{path} is empty; it must hold one token")
            return (token.encode(),)
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise ConfigError(field, f'{path} is not JSON; expected {{"primary": "...", "secondary": "..."}}') from None
        if not isinstance(data, dict) or not isinstance(data.get("primary"), str) or not data["primary"]:
            raise ConfigError(field, f'{path} needs a non-empty "primary" key (and optionally "secondary")')
        secondary = data.get("secondary")
        if secondary is not None and not isinstance(secondary, str):
            raise ConfigError(field, f'{path}: "secondary" must be a string')
        return tuple(k.encode() for k in (data["primary"], secondary) if k)
