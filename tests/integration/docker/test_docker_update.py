"""Updating a Docker service under traffic: no failed request, new version warm first."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from docker_helpers import Deployed, SpecFactory, binding, primary_key
from helpers_traffic import Traffic

from modelfleet.deployer.errors import DeploymentError
from modelfleet.deployer.samples import digits_rows
from modelfleet.deployer.targets.base import InferenceConfig, ServiceRecord
from modelfleet.deployer.targets.docker import DockerTarget

pytestmark = pytest.mark.docker


def call(record: ServiceRecord, key: str) -> str:
    assert record.scoring_uri
    r = httpx.post(
        record.scoring_uri,
        json={"data": digits_rows(1)},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return r.text


def test_update_under_traffic_drops_nothing_and_survives_restart(
    make_spec: SpecFactory,
    deployed: Deployed,
    docker_target: DockerTarget,
    docker_client: Any,
    digits_onnx: Path,
    digits_onnx_v2: Path,
) -> None:
    spec = make_spec()
    record = deployed.deploy(spec)
    key = primary_key(record)
    v1_answer = call(record, key)
    spec_v2 = make_spec(name=spec.name, workdir=spec.workdir, models=(binding(digits_onnx_v2, 2),))
    progress: list[str] = []
    assert record.scoring_uri
    with Traffic(
        record.scoring_uri, {"data": digits_rows(1)}, headers={"Authorization": f"Bearer {key}"}
    ) as traffic:
        deadline = time.monotonic() + 10
        while traffic.ok < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        updated = docker_target.update(record, spec_v2, progress.append)
        deployed.records[-1] = updated
        seen = traffic.ok
        deadline = time.monotonic() + 10
        while traffic.ok < seen + 20 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert traffic.failures == []
    assert traffic.ok > 40
    # the swapped-in release belongs to the server's unprivileged user, as the image's did
    code, out = docker_client.containers.get(record.target_data["container_id"]).exec_run(
        ["sh", "-c", "id -u; stat -c %u /var/modelfleet/current/ /var/modelfleet/current/model"]
    )
    assert code == 0, out
    assert out.decode().split() == ["10001"] * 3
    v2_answer = call(updated, key)
    assert v2_answer != v1_answer, "the new model answers differently"
    assert updated.models == ["digits:2"]
    assert updated.target_data["container_id"] == record.target_data["container_id"]
    assert v1_answer in traffic.bodies and v2_answer in traffic.bodies
    assert traffic.bodies.index(v2_answer) > traffic.bodies.index(v1_answer)

    # A restarted container comes back on the new version, not the image's first one.
    docker_client.containers.get(record.target_data["container_id"]).restart(timeout=10)
    deadline = time.monotonic() + 60
    while docker_target.status(updated).state != "healthy" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert call(updated, key) == v2_answer

    # A third version: the v2 image in between is dropped, the container's own is kept.
    spec_v3 = make_spec(name=spec.name, workdir=spec.workdir, models=(binding(digits_onnx, 3),))
    v3 = docker_target.update(updated, spec_v3, progress.append)
    deployed.records[-1] = v3
    assert v3.target_data["images"] == [record.target_data["image"], v3.target_data["image"]]
    import docker.errors

    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(updated.target_data["image"])
    assert call(v3, key) == v1_answer, "v3 carries v1's bytes"
    updated = docker_target.update(v3, spec_v2, progress.append)
    deployed.records[-1] = updated
    assert call(updated, key) == v2_answer

    # The updated image is the one a fresh deploy of spec_v2 would use (not rebuilt).
    tag, _release, built = docker_target.build(spec_v2, lambda _line: None)
    assert tag == updated.target_data["image"] and not built

    # Delete takes both the first and the updated image with it.
    docker_target.delete(updated, lambda _line: None)
    deployed.records.clear()
    for image in (record.target_data["image"], updated.target_data["image"]):
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(image)


def test_refused_update_keeps_old_version_serving(
    make_spec: SpecFactory, deployed: Deployed, docker_target: DockerTarget, tmp_path: Path
) -> None:
    record = deployed.deploy(make_spec())
    key = primary_key(record)
    before = call(record, key)
    src = tmp_path / "broken"
    src.mkdir()
    (src / "score.py").write_text(
        "def init():\n    raise RuntimeError('v2 weights are corrupt')\n\ndef run(data):\n    return data\n"
    )
    bad = make_spec(
        name=record.name,
        workdir=Path(record.target_data["workdir"]),
        inference=InferenceConfig(source_directory=src, entry_script="score.py"),
    )
    with pytest.raises(DeploymentError) as err:
        docker_target.update(record, bad, lambda _line: None)
    assert "v2 weights are corrupt" in str(err.value)
    assert "previous version keeps serving" in str(err.value)
    assert call(record, key) == before
    assert docker_target.status(record).state == "healthy"


def test_update_that_changes_requirements_is_refused_before_building(
    make_spec: SpecFactory, deployed: Deployed, docker_target: DockerTarget, tmp_path: Path
) -> None:
    record = deployed.deploy(make_spec())
    key = primary_key(record)
    before = call(record, key)
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("tabulate==0.9.0\n")
    changed = make_spec(
        name=record.name,
        workdir=Path(record.target_data["workdir"]),
        inference=InferenceConfig(requirements_file=reqs),
    )
    progress: list[str] = []
    with pytest.raises(DeploymentError, match="changes the pip requirements") as err:
        docker_target.update(record, changed, progress.append)
    assert "delete the service and deploy it again" in err.value.hint
    assert not any(line.startswith(("Step ", "pip wheel", "building")) for line in progress)
    assert call(record, key) == before
