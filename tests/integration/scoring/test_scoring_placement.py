"""Inline vs thread-pool scoring: a model picked to run inline that turns slow is moved to the pool."""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from modelfleet.scoring import ModelSpec

SCRIPTS = Path(__file__).resolve().parents[2] / "fixtures" / "scoring" / "scripts"


def _placement(client: httpx.Client) -> dict[str, object]:
    return client.get("/v2/models/turns-slow").json()["parameters"]  # type: ignore[no-any-return]


def _gauge(client: httpx.Client, metric: str) -> str:
    found = re.search(rf"^{metric}(?:{{[^}}]*}})? (\S+)$", client.get("/metrics").text, re.M)
    assert found, metric
    return found.group(1)


def test_inline_model_that_turns_slow_moves_to_the_pool(start_server, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    spec = ModelSpec(tmp_path, SCRIPTS / "score_turns_slow.py", name="turns-slow")
    # 2 ms: the warm-up of the decorated run() (~50 us) stays under it on a busy machine
    server = start_server(spec, inline_threshold_ms=2, scoring_timeout_ms=1000, max_concurrent_requests=2)
    model = server.host.active
    assert model is not None and model.inline  # picked from its fast warm-up
    caplog.set_level(logging.INFO, logger="modelfleet.scoring.server")
    with server.client() as c:
        assert _placement(c) == {"placement": "inline", "moved_to_pool": False}
        assert _gauge(c, "modelfleet_model_inline") == "1"
        # inline, the scoring timeout does not apply: 1.2 s answers 200, blocking the loop
        assert c.post("/score", json={"sleep_ms": 1200}).json() == {"slept_ms": 1200}
        assert model.inline  # one slow call may be the machine's fault
        for _ in range(2):
            assert c.post("/score", json={"sleep_ms": 50}).json() == {"slept_ms": 50}
        assert not model.inline and model.pool_only
        assert _placement(c) == {"placement": "thread_pool", "moved_to_pool": True}
        assert _gauge(c, "modelfleet_model_inline") == "0"
        assert _gauge(c, "modelfleet_model_moved_to_pool_total") == "1"

        # in the pool: health answers while slow requests are in flight ...
        with ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(c.post, "/score", json={"sleep_ms": 700}) for _ in range(2)]
            deadline = time.monotonic() + 10
            while server.server.pending < 2 and time.monotonic() < deadline:
                time.sleep(0.002)
            assert server.server.pending == 2
            with server.client() as other:
                assert other.get("/v2/health/live").json() == {"live": True}
            assert not any(f.done() for f in slow)  # answered while both were still running
            assert [f.result().json() for f in slow] == [{"slept_ms": 700}] * 2
        # ... and the scoring timeout applies
        r = c.post("/score", json={"sleep_ms": 1500})
        assert r.status_code == 504
        assert r.json()["error"] == "scoring timed out after 1000 ms"
        # demoted for good: fast calls do not bring it back inline
        for _ in range(70):
            assert c.post("/score", json={"sleep_ms": 0}).status_code == 200
        assert not model.inline
    moved = [r.getMessage() for r in caplog.records if "event=model_moved_to_pool" in r.getMessage()]
    assert len(moved) == 1, moved  # logged once
    assert "name=turns-slow" in moved[0]


def test_slow_inline_calls_that_fail_also_move_the_model_to_the_pool(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # a run() that gives up after a while (a backend timing out) blocks the loop as long as a slow answer
    spec = ModelSpec(tmp_path, SCRIPTS / "score_turns_slow.py", name="turns-slow")
    server = start_server(spec, inline_threshold_ms=2, scoring_timeout_ms=1000)
    model = server.host.active
    assert model is not None and model.inline
    with server.client() as c:
        for _ in range(3):
            r = c.post("/score", json={"sleep_ms": -50})
            assert r.status_code == 500
            assert r.json()["error"] == "run() raised TimeoutError: gave up after 50 ms"
        assert not model.inline and model.pool_only
        assert _placement(c) == {"placement": "thread_pool", "moved_to_pool": True}
        assert _gauge(c, "modelfleet_model_moved_to_pool_total") == "1"


def test_rare_preemption_like_stalls_do_not_demote_a_fast_model() -> None:
    from modelfleet.scoring.host import DEMOTE_RECENT, DEMOTE_WINDOW, LoadedModel

    class Runtime:
        raw = False

    model = LoadedModel(ModelSpec(Path(".")), Runtime(), 0.00001, 0.001)  # type: ignore[arg-type]
    assert model.inline
    # a 10 ms stall every DEMOTE_RECENT calls (far more often than a busy host preempts) ...
    for call in range(DEMOTE_WINDOW):
        assert not model.observe_inline_call(0.010 if call % DEMOTE_RECENT == 0 else 0.00001)
    # ... and a 30 ms one now and then
    for _ in range(2):
        assert not model.observe_inline_call(0.030)
        for _ in range(DEMOTE_WINDOW // 2):
            model.observe_inline_call(0.00001)
    assert model.inline
    # three slow calls close together do demote it
    assert not model.observe_inline_call(0.006)
    assert not model.observe_inline_call(0.00001)
    assert not model.observe_inline_call(0.006)
    assert model.observe_inline_call(0.006)
    assert not model.inline and model.pool_only


@pytest.mark.parametrize("stall_s", [0.030, 0.2])
def test_three_very_slow_calls_far_apart_demote(stall_s: float) -> None:
    from modelfleet.scoring.host import DEMOTE_RECENT, LoadedModel

    class Runtime:
        raw = False

    model = LoadedModel(ModelSpec(Path(".")), Runtime(), 0.00001, 0.001)  # type: ignore[arg-type]
    results = []
    for _ in range(3):
        results.append(model.observe_inline_call(stall_s))
        for _ in range(5 * DEMOTE_RECENT):
            model.observe_inline_call(0.00001)
    assert results == [False, False, True]
