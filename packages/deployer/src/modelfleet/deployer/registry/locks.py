"""Who runs an operation on a service (deploy, update, delete), and whether it still runs.

The registry stores the owner of a service's running operation (pid, the process's
start time, host) in the service's row; a second operation on the same service is
refused while that process lives. A pid alone is not enough: after the owner dies
the pid can be reused, so the kernel's start time of the process must match too.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

OperationName = Literal["deploy", "update", "delete"]
_VERB = {"deploy": "deployed", "update": "updated", "delete": "deleted"}
# A row left in one of these states by a CLI that never recorded an owner (a
# registry written before operations had owners) counts as an interrupted operation.
STATE_OF_OPERATION: dict[str, OperationName] = {
    "creating": "deploy",
    "updating": "update",
    "deleting": "delete",
}


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22).

    None when the process does not exist (or is a zombie) or /proc is unavailable.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and ')'
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _has_proc() -> bool:
    return Path("/proc/self/stat").exists()


@dataclass(frozen=True)
class ProcessIdentity:
    """One process, told apart from a later process that reuses its pid."""

    pid: int
    start_ticks: int | None  # None where /proc does not exist
    host: str

    @classmethod
    def current(cls) -> ProcessIdentity:
        return cls(os.getpid(), _start_ticks(os.getpid()), socket.gethostname())

    def is_remote(self) -> bool:
        """Another host (or a container) sharing this home: its pids mean nothing here."""
        return self.host != socket.gethostname()

    def is_alive(self) -> bool:
        if self.is_remote():
            return True  # we cannot tell, so assume it runs (`service delete --force` overrides)
        if not _has_proc():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        ticks = _start_ticks(self.pid)
        if ticks is None:
            return False
        return self.start_ticks is None or ticks == self.start_ticks


@dataclass(frozen=True)
class ServiceOperation:
    """The operation a service's row says is running, and who runs it."""

    name: OperationName
    owner: ProcessIdentity | None  # None: a legacy row that recorded no owner
    started_at: float
    models: tuple[str, ...] = ()  # model versions the operation is putting in place

    def is_alive(self) -> bool:
        return self.owner is not None and self.owner.is_alive()

    def _since(self) -> str:
        started = time.localtime(self.started_at)
        if time.strftime("%Y-%m-%d", started) == time.strftime("%Y-%m-%d"):
            return time.strftime("%H:%M:%S", started)
        return time.strftime("%Y-%m-%d %H:%M:%S", started)

    def _by(self) -> str:
        if self.owner is None:
            return "the modelfleet process"
        where = "" if self.owner.host == socket.gethostname() else f" on {self.owner.host}"
        return f"pid {self.owner.pid}{where}"

    def busy_message(self, service: str) -> str:
        return f"service {service!r} is being {_VERB[self.name]} by {self._by()} since {self._since()}"

    def busy_hint(self, service: str) -> str:
        if self.owner is not None and self.owner.is_remote():
            return (
                f"this machine cannot check a process on {self.owner.host}; wait for it, or if it "
                f"died there, `modelfleet service delete {service} --force` takes over"
            )
        stop = f" (kill {self.owner.pid})" if self.owner is not None else ""
        return f"wait for it to finish, or stop that command{stop} and try again"

    def interrupted_detail(self) -> str:
        pid = f" ({self._by()})" if self.owner is not None else ""
        return f"interrupted: the modelfleet process{pid} running {self.name} died"
