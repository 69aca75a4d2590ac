"""Where the deployer keeps its state: `$MODELFLEET_HOME` (default `~/.modelfleet`)."""

from __future__ import annotations

import os
from pathlib import Path


def modelfleet_home() -> Path:
    """The state folder: registry database, blobs, service workdirs."""
    env = os.environ.get("MODELFLEET_HOME")
    return Path(env).expanduser() if env else Path.home() / ".modelfleet"
