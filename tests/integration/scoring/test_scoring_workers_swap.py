"""`serve --workers 2`: one admin load swaps every worker (two phases), or none of them."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

SCRIPTS = Path(__file__).resolve().parents[2] / "fixtures" / "scoring" / "scripts"
ADMIN = "admin-token-for-the-workers-test"

# init() succeeds once, in whichever worker gets there first, and fails in every other:
# one worker prepares the candidate, the other refuses it
ONCE_ONLY = '''
import os

def init():
    marker = os.path.join(os.environ["AZUREML_MODEL_DIR"], "claimed")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        raise RuntimeError("the model was already claimed by another worker") from None

def run(data):
    return {"once": True}
'''


def _start(serve_process, tmp_path: Path, model: Path, *extra: str):  # type: ignore[no-untyped-def]
    admin = tmp_path / "admin.key"
    admin.write_text(ADMIN + "\n")
    return serve_process(
        "--model-dir", str(model.parent), "--model-name", "digits", "--model-version", "1",
        "--workers", "2", "--admin-key-file", str(admin), *extra,
    )


def _load(url: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(
        f"{url}/v2/repository/models/digits/load", json=body,
        headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60,
    )


def _fresh_answers(url: str, rows: list[list[float]], n: int, headers: dict[str, str] | None = None) -> list[httpx.Response]:
    """n requests, each on a new connection (so both workers get some)."""
    answers = []
    for _ in range(n):
        with httpx.Client(base_url=url, timeout=10, headers=headers) as c:
            answers.append(c.post("/score", json={"data": rows}))
    return answers


def _worker_pids(pid: int) -> set[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {int(c) for c in children}


def test_one_load_swaps_every_worker_and_a_restarted_worker_serves_it(  # type: ignore[no-untyped-def]
    serve_process, tmp_path, digits_onnx, digits_onnx_v2, digits_rows
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"primary": "key-one", "secondary": "key-two"}))
    proc, url = _start(serve_process, tmp_path, digits_onnx, "--keys-file", str(keys))
    auth = {"Authorization": "Bearer key-one"}
    assert len(_worker_pids(proc.pid)) == 2

    r = _load(url, {"model_dir": str(digits_onnx_v2.parent), "version": "2"})
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "digits", "version": "2"}
    answers = _fresh_answers(url, digits_rows[:1], 60, auth)
    assert [a.status_code for a in answers] == [200] * 60
    assert {a.headers["x-model-version"] for a in answers} == {"2"}
    # the request id prefix is per process: both workers answered, both on version 2
    assert len({a.headers["x-request-id"].split("-")[0] for a in answers}) == 2

    # keys rotate in every worker (each re-reads the file on mtime change)
    tmp = tmp_path / "keys.tmp"
    tmp.write_text(json.dumps({"primary": "key-three", "secondary": "key-two"}))
    os.replace(tmp, keys)
    deadline = time.monotonic() + 10
    while True:
        statuses = [a.status_code for a in _fresh_answers(url, digits_rows[:1], 10, {"Authorization": "Bearer key-three"})]
        if statuses == [200] * 10 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert statuses == [200] * 10
    assert {a.status_code for a in _fresh_answers(url, digits_rows[:1], 10, auth)} == {401}

    # SIGHUP (re-read keys) goes to every worker and stops none
    before = _worker_pids(proc.pid)
    os.kill(proc.pid, signal.SIGHUP)
    assert [a.status_code for a in _fresh_answers(url, digits_rows[:1], 10, {"Authorization": "Bearer key-three"})] == [200] * 10
    assert _worker_pids(proc.pid) == before

    # a worker that dies is forked again, on the committed version (2), not the start-up one
    old = _worker_pids(proc.pid)
    victim = min(old)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (pids := _worker_pids(proc.pid)) == old or len(pids) < 2 or victim in pids:
        assert time.monotonic() < deadline, f"no worker restarted: {pids}"
        time.sleep(0.05)
    new_pid = (pids - old).pop()
    prefixes: set[str] = set()
    deadline = time.monotonic() + 20
    auth = {"Authorization": "Bearer key-three"}
    while len(prefixes) < 2:  # until the new worker answers too
        assert time.monotonic() < deadline, "the restarted worker never answered"
        for a in _fresh_answers(url, digits_rows[:1], 10, auth):
            assert a.status_code == 200 and a.headers["x-model-version"] == "2", (a.status_code, a.text)
            prefixes.add(a.headers["x-request-id"].split("-")[0])
    assert new_pid in _worker_pids(proc.pid) and proc.poll() is None
    proc.terminate()
    assert proc.wait(10) == 0


def test_a_candidate_refused_by_one_worker_is_discarded_by_all(  # type: ignore[no-untyped-def]
    serve_process, tmp_path, digits_onnx, digits_rows
) -> None:
    proc, url = _start(serve_process, tmp_path, digits_onnx)
    once = tmp_path / "once"
    once.mkdir()
    (once / "score.py").write_text(ONCE_ONLY)

    r = _load(url, {"model_dir": str(once), "entry_script": "score.py", "version": "2"})
    assert r.status_code == 422, r.text
    assert r.json()["stage"] == "load"
    assert "init() raised RuntimeError: the model was already claimed by another worker" in r.json()["error"]
    assert (once / "claimed").exists()  # one worker did prepare it, and must have dropped it

    r = _load(url, {"model_dir": str(tmp_path), "entry_script": str(SCRIPTS / "score_bad_warmup.py"), "version": "3"})
    assert r.status_code == 422, r.text
    assert r.json()["stage"] == "warmup" and "this model is broken" in r.json()["error"]
    assert r.json()["request_id"]

    answers = _fresh_answers(url, digits_rows[:1], 60)
    assert [a.status_code for a in answers] == [200] * 60
    assert {a.headers["x-model-version"] for a in answers} == {"1"}
    assert len({a.headers["x-request-id"].split("-")[0] for a in answers}) == 2
    proc.terminate()
    out = proc.communicate(timeout=10)[0]
    assert out.count("event=model_discarded") == 1  # the worker that prepared "once"
    assert "event=swap_refused" in out


def _probs(model: Path, rows: list[list[float]]) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"X": np.asarray(rows, np.float32)})[0]


def test_traffic_through_a_swap_on_two_workers_never_fails_nor_goes_back(  # type: ignore[no-untyped-def]
    serve_process, tmp_path, digits_onnx, digits_onnx_v2, digits_rows
) -> None:
    rows = digits_rows[:2]
    expected = {"1": _probs(digits_onnx, rows), "2": _probs(digits_onnx_v2, rows)}
    _proc, url = _start(serve_process, tmp_path, digits_onnx)
    stop = threading.Event()
    lock = threading.Lock()
    # (sent at, version by header, versions the body matches, status)
    answers: list[tuple[float, str | None, list[str], int]] = []

    def fire(fresh: bool) -> None:
        client = httpx.Client(base_url=url, timeout=30)
        try:
            while not stop.is_set():
                if fresh:  # a new connection each time: lands on either worker
                    client.close()
                    client = httpx.Client(base_url=url, timeout=30)
                sent = time.monotonic()
                try:
                    r = client.post("/score", json={"data": rows})
                except httpx.HTTPError as exc:
                    with lock:
                        answers.append((sent, None, [repr(exc)], 0))
                    continue
                matches = []
                if r.status_code == 200:
                    probs = np.asarray(r.json()["probabilities"])
                    matches = [v for v, p in expected.items() if np.allclose(probs, p, rtol=1e-5)]
                with lock:
                    answers.append((sent, r.headers.get("x-model-version"), matches, r.status_code))
        finally:
            client.close()

    threads = [threading.Thread(target=fire, args=(i % 2 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while len(answers) < 100:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = _load(url, {"model_dir": str(digits_onnx_v2.parent), "version": "2"})
        swapped_at = time.monotonic()
        assert r.status_code == 200, r.text
        with lock:
            target = len(answers) + 200
        while len(answers) < target:
            assert time.monotonic() < deadline + 20
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    failures = [a for a in answers if a[3] != 200]
    assert not failures, failures[:5]
    assert all(a[2] == [a[1]] for a in answers), [a for a in answers if a[2] != [a[1]]][:5]
    late = [a for a in answers if a[0] > swapped_at]
    assert len(late) >= 200 and {a[1] for a in late} == {"2"}
    assert {a[1] for a in answers if a[0] < swapped_at} >= {"1"}


def test_prepare_then_discard_changes_nothing_and_commit_switches(tmp_path, digits_onnx, digits_onnx_v2, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from modelfleet.scoring import ModelHost, ModelSpec

    monkeypatch.delenv("AZUREML_MODEL_DIR", raising=False)
    (tmp_path / "score.py").write_text("def init():\n    pass\n\ndef run(data):\n    return 1\n")
    host = ModelHost()
    host.load(ModelSpec(digits_onnx.parent, name="digits", version="1"))
    candidate = host.prepare(ModelSpec(tmp_path, "score.py", name="digits", version="2"))
    assert os.environ["AZUREML_MODEL_DIR"] == str(tmp_path)  # set for its init()
    assert host.active is not None and host.active.version == "1"
    host.discard(candidate)
    assert "AZUREML_MODEL_DIR" not in os.environ and candidate.model.closed
    assert host.active.version == "1"
    first = host.active
    committed = host.commit(host.prepare(ModelSpec(digits_onnx_v2.parent, name="digits", version="3")))
    assert host.active is committed and committed.version == "3" and first.closed
    host.unload()
