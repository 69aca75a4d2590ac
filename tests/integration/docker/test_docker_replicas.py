"""numReplicas N on the Docker target: one container whose server runs N workers.

Proves: the container holds the supervisor and N worker processes; an update
under traffic fails nothing and afterwards only the new version answers, from
every worker; `docker stop` reaches the supervisor (through tini, PID 1), which
stops its workers and exits 0 well within the grace period; a restarted
container comes back with N workers on the new version; `service delete`
stops it promptly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker.errors
import httpx
import pytest
from docker_helpers import Deployed, SpecFactory, binding, primary_key
from helpers_traffic import Traffic

from modelfleet.deployer.samples import digits_rows
from modelfleet.deployer.targets.base import DeploymentConfig
from modelfleet.deployer.targets.docker import DockerTarget

pytestmark = pytest.mark.docker


def _poll(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def _server_processes(container: Any) -> tuple[int, list[int]]:
    """The supervisor's pid and its worker pids, as `docker top` shows them."""
    top = container.top(ps_args="-o pid,ppid,args")
    rows = [(int(p[0]), int(p[1]), str(p[2])) for p in top["Processes"]]
    servers = [(pid, ppid) for pid, ppid, args in rows if "modelfleet.scoring serve" in args]
    server_pids = {pid for pid, _ in servers}
    parents = [pid for pid, ppid in servers if ppid not in server_pids]
    assert len(parents) == 1, rows
    return parents[0], [pid for pid, ppid in servers if ppid == parents[0]]


def _fresh_answers(uri: str, key: str, n: int = 40) -> list[httpx.Response]:
    """One request per new connection: the kernel spreads them over the workers."""
    answers = []
    for _ in range(n):
        with httpx.Client(timeout=10) as client:
            answers.append(
                client.post(
                    uri, json={"data": digits_rows(1)}, headers={"Authorization": f"Bearer {key}"}
                )
            )
    return answers


def test_replicas_run_as_workers_swap_together_and_stop_cleanly(
    make_spec: SpecFactory,
    deployed: Deployed,
    docker_target: DockerTarget,
    docker_client: Any,
    digits_onnx: Path,
    digits_onnx_v2: Path,
) -> None:
    deployment = DeploymentConfig(
        cpu_cores=1.0, memory_gb=0.75, replicas=2, autoscale_enabled=True, autoscale_max_replicas=4
    )
    spec = make_spec(deployment=deployment)
    record = deployed.deploy(spec)
    note = (
        "autoScaler ignored: the docker target runs a fixed number of worker processes "
        "in one container (numReplicas, here 2), sharing its cpu/memory limits"
    )
    assert note in deployed.progress
    assert record.target_data["workers"] == 2 and record.target_data["note"] == note
    container = docker_client.containers.get(record.target_data["container_id"])
    _parent, workers = _server_processes(container)
    assert len(workers) == 2, "numReplicas 2: the supervisor forked two workers"

    uri, key = str(record.scoring_uri), primary_key(record)
    spec_v2 = make_spec(
        name=spec.name,
        workdir=spec.workdir,
        deployment=deployment,
        models=(binding(digits_onnx_v2, 2),),
    )
    with Traffic(
        uri, {"data": digits_rows(1)}, headers={"Authorization": f"Bearer {key}"}
    ) as traffic:
        assert _poll(lambda: traffic.ok > 30)
        updated = docker_target.update(record, spec_v2, lambda _line: None)
        deployed.records[-1] = updated
        seen = len(traffic.answers)
        assert _poll(lambda: len(traffic.answers) > seen + 60)
    assert traffic.failures == []
    versions = [a.version for a in traffic.answers]
    assert "1" in versions[:seen]
    # after the update returned only requests already in flight (one per client) may be old
    assert set(versions[seen + len(traffic.threads) :]) == {"2"}
    fresh = _fresh_answers(uri, key)
    assert {(r.status_code, r.headers["x-model-version"]) for r in fresh} == {(200, "2")}
    assert len({r.headers["x-request-id"].split("-")[0] for r in fresh}) == 2, "both workers answer"
    assert updated.target_data["workers"] == 2 and updated.target_data["note"] == note

    # docker stop: SIGTERM reaches the supervisor, which stops its workers and exits 0
    started = time.monotonic()
    container.stop(timeout=10)
    stop_s = time.monotonic() - started
    container.reload()
    assert container.attrs["State"]["ExitCode"] == 0, container.logs(tail=20).decode()
    assert stop_s < 5, f"docker stop took {stop_s:.1f}s: the server did not stop on SIGTERM"

    # a restart comes back with two workers on the swapped-in version
    container.start()
    assert _poll(lambda: docker_target.status(updated).state == "healthy", timeout=60)
    assert len(_server_processes(container)[1]) == 2
    fresh = _fresh_answers(uri, key, 20)
    assert {(r.status_code, r.headers["x-model-version"]) for r in fresh} == {(200, "2")}

    started = time.monotonic()
    docker_target.delete(updated, lambda _line: None)
    delete_s = time.monotonic() - started
    deployed.records.clear()
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(record.target_data["container_id"])
    assert delete_s < 6, f"service delete took {delete_s:.1f}s"
