"""The operation lock of a service in the registry database: owner, liveness, take-over."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from modelfleet.deployer.errors import ServiceBusyError, ServiceExistsError
from modelfleet.deployer.registry import Registry
from modelfleet.deployer.registry.locks import ProcessIdentity
from modelfleet.deployer.targets.base import ServiceRecord


def _dead_identity() -> ProcessIdentity:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return ProcessIdentity(proc.pid, 1, socket.gethostname())


def _own(registry: Registry, name: str, owner: ProcessIdentity, op: str = "update") -> None:
    with sqlite3.connect(registry.db_path) as conn:
        conn.execute(
            "UPDATE services SET op = ?, op_pid = ?, op_pid_start = ?, op_host = ?,"
            " op_started_at = 0, state = 'updating' WHERE name = ?",
            (op, owner.pid, owner.start_ticks, owner.host, name),
        )


def test_a_reused_pid_does_not_count_as_the_owner() -> None:
    me = ProcessIdentity.current()
    assert me.is_alive()
    assert me.start_ticks is not None
    reused = ProcessIdentity(me.pid, me.start_ticks + 1, me.host)  # same pid, later process
    assert not reused.is_alive()
    assert not _dead_identity().is_alive()
    # another machine sharing the home: cannot be checked, so it is assumed to run
    assert ProcessIdentity(me.pid, 1, "elsewhere.example").is_alive()


def test_an_operation_of_a_live_process_refuses_others(home: Path) -> None:
    registry = Registry(home)
    registry.reserve_service("svc", "local", {})
    with pytest.raises(ServiceBusyError, match=rf"service 'svc' is being deployed by pid {os.getpid()} since"):
        registry.begin_operation("svc", "delete")
    with pytest.raises(ServiceBusyError, match="being deployed"):
        registry.reserve_service("svc", "local", {})
    registry.save_service(ServiceRecord("svc", "local", "healthy"))  # ends the deploy
    record, interrupted = registry.begin_operation("svc", "update")
    assert record.state == "healthy" and interrupted is None
    registry.end_operation("svc", "healthy")
    with pytest.raises(ServiceExistsError, match=r"service 'svc' already exists \(state healthy\)"):
        registry.reserve_service("svc", "local", {})


def test_an_operation_of_a_dead_process_is_taken_over(home: Path) -> None:
    registry = Registry(home)
    registry.reserve_service("svc", "local", {})
    registry.save_service(ServiceRecord("svc", "local", "healthy"))
    dead = _dead_identity()
    _own(registry, "svc", dead)
    _, running = registry.get_service_operation("svc")
    assert running is not None and not running.is_alive()
    assert running.interrupted_detail() == (
        f"interrupted: the modelfleet process (pid {dead.pid}) running update died"
    )
    with pytest.raises(ServiceExistsError, match=r"already exists \(state failed\)"):
        registry.reserve_service("svc", "local", {})  # an interrupted update: the service exists
    record, interrupted = registry.begin_operation("svc", "delete")
    assert record.state == "failed" and interrupted == running


def test_an_interrupted_deploy_of_the_same_name_is_taken_over(home: Path) -> None:
    registry = Registry(home)
    registry.reserve_service("svc", "local", {}, target_data={"workdir": "/somewhere"})
    _own(registry, "svc", _dead_identity(), op="deploy")
    stale = registry.reserve_service("svc", "local", {"new": True})
    assert stale is not None and stale.target_data == {"workdir": "/somewhere"}
    _, running = registry.get_service_operation("svc")
    assert running is not None and running.is_alive() and running.name == "deploy"


def test_a_row_stuck_in_a_transitional_state_without_owner_counts_as_interrupted(
    home: Path,
) -> None:
    """A registry written before operations had owners (a deploy killed then)."""
    registry = Registry(home)
    with sqlite3.connect(registry.db_path) as conn:
        conn.execute(
            "INSERT INTO services (name, target, state, created_at, updated_at)"
            " VALUES ('old', 'local', 'creating', 0, 0)"
        )
    _, running = registry.get_service_operation("old")
    assert running is not None and running.name == "deploy" and not running.is_alive()
    assert running.interrupted_detail() == "interrupted: the modelfleet process running deploy died"
    assert registry.reserve_service("old", "local", {}) is not None


def test_a_registry_created_before_operation_owners_is_migrated(home: Path) -> None:
    home.mkdir(parents=True)
    with sqlite3.connect(home / "registry.db") as conn:
        conn.execute(
            "CREATE TABLE services (name TEXT PRIMARY KEY, target TEXT NOT NULL,"
            " state TEXT NOT NULL, scoring_uri TEXT, swagger_uri TEXT,"
            " models TEXT NOT NULL DEFAULT '[]', target_data TEXT NOT NULL DEFAULT '{}',"
            " config TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL,"
            " updated_at REAL NOT NULL)"
        )
        conn.execute(
            "INSERT INTO services (name, target, state, created_at, updated_at)"
            " VALUES ('kept', 'local', 'healthy', 0, 0)"
        )
    registry = Registry(home)
    record, running = registry.get_service_operation("kept")
    assert record.state == "healthy" and running is None
    registry.begin_operation("kept", "update")
    with pytest.raises(ServiceBusyError):
        Registry(home).begin_operation("kept", "delete")


def test_a_lock_held_on_another_host_is_kept_unless_delete_is_forced(
    home: Path, cli: Callable[..., Result]
) -> None:
    registry = Registry(home)
    registry.reserve_service("shared", "local", {})
    registry.save_service(ServiceRecord("shared", "local", "healthy"))
    _own(registry, "shared", ProcessIdentity(4242, 1, "elsewhere.example"))
    refused = cli("service", "delete", "shared")
    assert refused.exit_code == 1
    assert "error: service 'shared' is being updated by pid 4242 on elsewhere.example since" in (
        refused.stderr
    )
    assert "hint: this machine cannot check a process on elsewhere.example; wait for it, or if it" \
        " died there, `modelfleet service delete shared --force` takes over" in refused.stderr
    forced = cli("service", "delete", "shared", "--force")
    assert forced.exit_code == 0, forced.output
    assert "taking over (interrupted: the modelfleet process (pid 4242 on elsewhere.example)" in (
        forced.stderr
    )
    assert registry.list_services() == []
