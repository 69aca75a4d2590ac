"""How the deployer opens `registry.db` and takes a write transaction.

The registry and the fleet tables share one SQLite file; both open it the
same way (WAL, a 30 s busy timeout, explicit transactions) so that concurrent
CLI calls and a fleet controller serialise on the write lock instead of failing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal


def connect(path: Path, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are taken with `write_transaction`)."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=check_same_thread)
    conn.row_factory = sqlite3.Row
    return conn


def set_pragmas(conn: sqlite3.Connection, *, synchronous: Literal["NORMAL", "FULL"]) -> None:
    """WAL journal, the given durability, and a busy timeout matching `connect`'s."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes the lock up front (no upgrade deadlocks)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        # SQLite has already rolled back after some errors (SQLITE_FULL, SQLITE_IOERR): a second
        # ROLLBACK would fail and hide the real error ("disk is full") behind "no transaction"
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
