"""Telemetry: one msgpack record per interval, queued on disk, sent oldest first when the link is up.

The queue is a folder of one file per record, named by its sequence number:
appending is a write plus a rename (a crash leaves no half record), sending
deletes files only after the broker acknowledged them, and a bound on the
folder's size drops the oldest records, counting them in `dropped`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from .durable import write_atomic

log = logging.getLogger("modelfleet.agent.telemetry")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class TelemetryQueue:
    """A bounded, ordered, crash-safe queue of telemetry records on disk."""

    def __init__(self, folder: Path, *, max_bytes: int = 4 * 1024 * 1024, max_records: int = 10_000) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_records = max_records
        self._meta = self.folder / "meta.json"
        meta = self._load_meta()
        self.dropped: int = int(meta.get("dropped", 0))
        self._entries: list[tuple[int, int]] = []  # (seq, size), oldest first
        self._sending: set[int] = set()
        for path in self.folder.glob("*.rec"):
            try:
                self._entries.append((int(path.stem), path.stat().st_size))
            except ValueError:
                path.unlink(missing_ok=True)
        for tmp in self.folder.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        self._entries.sort()
        last = self._entries[-1][0] if self._entries else 0
        self.next_seq: int = max(int(meta.get("next_seq", 1)), last + 1)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return sum(size for _, size in self._entries)

    def _load_meta(self) -> dict[str, Any]:
        try:
            data = json.loads(self._meta.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_meta(self) -> None:
        # durable: after a power cut a lost next_seq would restart at 1, and consumers
        # (which drop a seq they have seen) would discard every new record
        write_atomic(self._meta, json.dumps({"next_seq": self.next_seq, "dropped": self.dropped}).encode())

    def _path(self, seq: int) -> Path:
        return self.folder / f"{seq:016d}.rec"

    def append(self, record: dict[str, Any]) -> int:
        """Stamp `record` with the next `seq` and the drop count, store it; its seq."""
        seq = self.next_seq
        record = {**record, "seq": seq, "dropped": self.dropped}
        data = msgpack.packb(record, use_bin_type=True)
        try:
            write_atomic(self._path(seq), data)
        except OSError:
            # e.g. a full disk: the record is lost, so count it like one the bound dropped (the
            # consumer learns of it) and keep its seq for the next one (a gap would say nothing)
            self.dropped += 1
            raise
        self.next_seq += 1
        self._entries.append((seq, len(data)))
        self._enforce_bound()
        self._save_meta()
        return seq

    def _enforce_bound(self) -> None:
        # records being sent are never dropped: one of them may still arrive, and then a
        # drop count that included it would be wrong (the bound may be exceeded by one batch)
        total = self.size_bytes
        i = 0
        while i < len(self._entries) and (len(self._entries) > self.max_records or total > self.max_bytes):
            seq, size = self._entries[i]
            if seq in self._sending:
                i += 1
                continue
            del self._entries[i]
            self._path(seq).unlink(missing_ok=True)
            total -= size
            self.dropped += 1
            log.warning("event=telemetry_dropped seq=%d dropped_total=%d", seq, self.dropped)

    def peek(self, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Up to `limit` oldest records, with their seq; they count as being sent until
        `ack()` (delivered) or `release()` (not delivered, stay queued)."""
        out: list[tuple[int, dict[str, Any]]] = []
        for seq, _ in self._entries[:limit]:
            self._sending.add(seq)
            try:
                record = msgpack.unpackb(self._path(seq).read_bytes(), raw=False)
                if not isinstance(record, dict):  # e.g. a zero-filled file after a power cut
                    raise ValueError(f"not a record: {type(record).__name__}")
                out.append((seq, record))
            except (OSError, ValueError) as exc:
                # a damaged file: lost like a record the bound dropped, and counted so
                log.error("event=telemetry_unreadable seq=%d reason=%r", seq, str(exc))
                self.ack([seq])
                self.dropped += 1
        return out

    def release(self, seqs: list[int]) -> None:
        """Records that were not delivered: droppable again."""
        self._sending.difference_update(seqs)

    def ack(self, seqs: list[int]) -> None:
        """Forget delivered records."""
        done = set(seqs)
        self._sending.difference_update(done)
        for seq in done:
            self._path(seq).unlink(missing_ok=True)
        self._entries = [e for e in self._entries if e[0] not in done]


def percentile(buckets: list[float], counts: list[int], q: float) -> float | None:
    """The q-quantile (0..1) estimated from a histogram by linear interpolation inside the bucket."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for i, count in enumerate(counts):
        upper = buckets[i] if i < len(buckets) else buckets[-1] * 2
        if count and seen + count >= rank:
            return lower + (upper - lower) * ((rank - seen) / count)
        seen += count
        lower = upper
    return lower


def rss_bytes() -> int:
    """This process's resident memory, from /proc (0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class TelemetryCollector:
    """Turns the scoring host's cumulative counters into per-interval records."""

    def __init__(
        self,
        device_id: str,
        snapshot: Callable[[], dict[str, Any]],
        swap_events: Callable[[], list[dict[str, Any]]],
    ) -> None:
        self.device_id = device_id
        self._snapshot = snapshot
        self._swap_events = swap_events
        self._last = snapshot()
        self._last_time = time.monotonic()
        self._last_cpu = _cpu_seconds()

    def collect(self) -> dict[str, Any]:
        now = time.monotonic()
        snap = self._snapshot()
        cpu = _cpu_seconds()
        interval = max(now - self._last_time, 1e-6)
        prev = self._last
        counts = [a - b for a, b in zip(snap["latency_counts"], prev["latency_counts"], strict=False)]
        buckets = list(snap["latency_buckets"])
        model = {"name": snap["model_name"], "version": snap["model_version"]} if snap["model_name"] else None
        record = {
            "device_id": self.device_id,
            "ts": time.time(),
            "interval_s": round(interval, 3),
            "model": model,
            "requests": snap["requests"] - prev["requests"],
            "errors": snap["errors"] - prev["errors"],
            "rejected": snap["rejected"] - prev["rejected"],
            "latency": {
                "buckets": buckets,
                "counts": counts,
                "p50": percentile(buckets, counts, 0.5),
                "p90": percentile(buckets, counts, 0.9),
                "p99": percentile(buckets, counts, 0.99),
            },
            "cpu_s": round(cpu - self._last_cpu, 4),
            "cpu_percent": round(100.0 * (cpu - self._last_cpu) / interval, 2),
            "rss_bytes": rss_bytes(),
            "swaps": self._swap_events(),
        }
        self._last, self._last_time, self._last_cpu = snap, now, cpu
        return record


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system
