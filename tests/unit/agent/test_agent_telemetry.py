"""Telemetry: the bounded on-disk queue, per-interval records and histogram percentiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from modelfleet.agent.telemetry import TelemetryCollector, TelemetryQueue, percentile
from modelfleet.scoring.metrics import ScoringMetrics


def test_queue_keeps_order_and_survives_reopen(tmp_path: Path) -> None:
    q = TelemetryQueue(tmp_path)
    for i in range(5):
        q.append({"n": i})
    q.ack([seq for seq, _ in q.peek(2)])
    reopened = TelemetryQueue(tmp_path)
    assert [rec["n"] for _, rec in reopened.peek(10)] == [2, 3, 4]
    assert reopened.append({"n": 5}) == 6  # seq continues, never reused


def test_seq_survives_a_fully_drained_queue(tmp_path: Path) -> None:
    q = TelemetryQueue(tmp_path)
    q.append({})
    q.append({})
    q.ack([1, 2])
    assert TelemetryQueue(tmp_path).append({}) == 3


def test_bound_drops_oldest_and_counts_them(tmp_path: Path) -> None:
    q = TelemetryQueue(tmp_path, max_records=3)
    for i in range(7):
        q.append({"n": i})
    records = [rec for _, rec in q.peek(10)]
    assert [r["n"] for r in records] == [4, 5, 6]
    assert q.dropped == 4
    assert records[-1]["dropped"] == 3  # stamped when written (before its own append pushed one out)
    assert TelemetryQueue(tmp_path, max_records=3).dropped == 4


def test_byte_bound(tmp_path: Path) -> None:
    q = TelemetryQueue(tmp_path, max_bytes=1000)
    for _ in range(20):
        q.append({"blob": "x" * 200})
    assert q.size_bytes <= 1000 and q.dropped > 0


def test_percentile_interpolates_inside_buckets() -> None:
    buckets = [0.001, 0.01, 0.1]
    assert percentile(buckets, [0, 0, 0, 0], 0.5) is None
    assert percentile(buckets, [10, 0, 0, 0], 0.5) == 0.0005
    assert percentile(buckets, [50, 49, 1, 0], 0.99) == pytest.approx(0.01)
    assert percentile(buckets, [0, 0, 10, 0], 0.5) == pytest.approx(0.055)


def test_collector_reports_interval_deltas_and_swaps(tmp_path: Path) -> None:
    metrics = ScoringMetrics()
    swaps: list[dict[str, Any]] = [{"to": "m:2", "ok": True}]
    collector = TelemetryCollector("dev", metrics.snapshot, lambda: swaps.copy())
    metrics.set_active("m", "1")
    for _ in range(3):
        metrics.observe(200, 0.002)
    metrics.observe(500, 0.02)
    first = collector.collect()
    assert first["requests"] == 4 and first["errors"] == 1
    assert first["model"] == {"name": "m", "version": "1"}
    assert first["swaps"] == swaps and first["rss_bytes"] > 0
    assert 0.001 < first["latency"]["p50"] <= 0.0025
    second = collector.collect()
    assert second["requests"] == 0 and second["latency"]["p50"] is None
    msgpack.packb(second)  # encodable as is


def test_records_being_sent_are_not_dropped(tmp_path: Path) -> None:
    q = TelemetryQueue(tmp_path, max_records=3)
    for i in range(3):
        q.append({"n": i})
    sending = [seq for seq, _ in q.peek(1)]  # seq 1 is on the wire
    q.append({"n": 3})
    assert [rec["n"] for _, rec in q.peek(10)] == [0, 2, 3]  # seq 2 went instead
    q.release([1, 2, 3, 4])
    q.ack(sending)
    q.append({"n": 4})
    assert [rec["n"] for _, rec in q.peek(10)] == [2, 3, 4]
    assert q.dropped == 1


def test_a_record_that_cannot_be_written_is_counted_as_dropped(small_disk: Path) -> None:
    q = TelemetryQueue(small_disk / "queue")
    assert q.append({"n": 0}) == 1
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError, match="No space left on device"):
        while True:  # fill the disk to the last block
            f.write(b"\0" * 4096)
    with pytest.raises(OSError, match="No space left on device"):
        q.append({"n": 1, "blob": "x" * 8192})
    assert not list((small_disk / "queue").glob("*.tmp"))  # no half record left behind
    filler.unlink()
    assert q.append({"n": 2}) == 2  # no gap in seq: consumers read a gap as nothing
    records = [rec for _, rec in q.peek(10)]
    assert [r["n"] for r in records] == [0, 2]
    assert records[-1]["dropped"] == 1  # the lost record is reported like one the bound dropped
    assert TelemetryQueue(small_disk / "queue").dropped == 1


def test_an_unreadable_record_is_skipped_and_counted_as_dropped(tmp_path: Path) -> None:
    q = TelemetryQueue(tmp_path)
    for i in range(3):
        q.append({"n": i})
    (tmp_path / f"{2:016d}.rec").write_bytes(b"\xc1")  # 0xc1 is never valid msgpack: a damaged file
    (tmp_path / f"{3:016d}.rec").write_bytes(b"\0")  # zero-filled by a power cut: valid msgpack, not a record
    assert [rec["n"] for _, rec in q.peek(10)] == [0]
    assert len(q) == 1 and q.dropped == 2
    assert q.append({"n": 3}) == 4
    assert [rec["dropped"] for _, rec in q.peek(10)][-1] == 2  # the consumer learns of the loss
