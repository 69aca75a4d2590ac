"""The Docker target against a real engine: build, run, call, limits, keys, cache, delete."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from docker_helpers import Deployed, SpecFactory, containers_of

from modelfleet.deployer.samples import digits_rows
from modelfleet.deployer.targets.base import DeploymentConfig, ServiceRecord, ServiceSpec
from modelfleet.deployer.targets.docker import DockerTarget

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def service(
    docker_target: DockerTarget, digits_onnx: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceSpec, ServiceRecord, list[str]]]:
    """One digits service shared by the read-only tests of this module."""
    from docker_helpers import binding

    from modelfleet.deployer.targets.base import InferenceConfig

    name = f"t-shared-{uuid.uuid4().hex[:6]}"  # unique: a crashed earlier run cannot block it
    spec = ServiceSpec(
        name=name,
        models=(binding(digits_onnx),),
        inference=InferenceConfig(),
        deployment=DeploymentConfig(cpu_cores=0.5, memory_gb=0.5),
        workdir=tmp_path_factory.mktemp("svc") / name,
    )
    progress: list[str] = []
    record = docker_target.deploy(spec, progress.append)
    yield spec, record, progress
    docker_target.delete(record, lambda _line: None)


def keys(spec: ServiceSpec) -> dict[str, str]:
    data = json.loads((spec.workdir / "secrets" / "keys.json").read_text())
    return {str(k): str(v) for k, v in data.items()}


def score(record: ServiceRecord, key: str | None, rows: int = 2) -> httpx.Response:
    assert record.scoring_uri
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        record.scoring_uri, json={"data": digits_rows(rows)}, headers=headers, timeout=10
    )


def test_deployed_service_answers_with_key_and_refuses_without(
    service: tuple[ServiceSpec, ServiceRecord, list[str]],
) -> None:
    spec, record, progress = service
    assert record.state == "healthy"
    assert record.models == ["digits:1"]
    assert any("waiting for /v2/health/ready" in line for line in progress)
    ok = score(record, keys(spec)["primary"])
    assert ok.status_code == 200, ok.text
    assert score(record, keys(spec)["secondary"]).status_code == 200
    assert score(record, None).status_code == 401
    assert score(record, "not-a-key").status_code == 401
    # health stays open, as Azure ML's
    port = record.target_data["port"]
    assert httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status_code == 200


def test_container_has_limits_loopback_port_labels_and_readonly_workdir(
    service: tuple[ServiceSpec, ServiceRecord, list[str]], docker_client: Any
) -> None:
    spec, record, _ = service
    attrs = docker_client.api.inspect_container(record.target_data["container_id"])
    host = attrs["HostConfig"]
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == 512 * 1024 * 1024
    assert host["MemorySwap"] == host["Memory"], "no swap beyond the memory limit"
    assert host["Init"] is True
    assert host["RestartPolicy"]["Name"] == "unless-stopped"
    bindings = host["PortBindings"]["5001/tcp"]
    assert bindings == [{"HostIp": "127.0.0.1", "HostPort": str(record.target_data["port"])}]
    assert attrs["Config"]["Labels"]["modelfleet.service"] == spec.name
    mounts = {m["Destination"]: m for m in attrs["Mounts"]}
    assert mounts["/var/modelfleet/service"]["RW"] is False


def test_unchanged_spec_is_not_rebuilt(
    service: tuple[ServiceSpec, ServiceRecord, list[str]], docker_target: DockerTarget
) -> None:
    spec, record, _ = service
    progress: list[str] = []
    tag, release, built = docker_target.build(spec, progress.append)
    assert not built
    assert tag == record.target_data["image"]
    assert release.id == record.target_data["release"]
    assert not any(line.startswith("Step ") for line in progress)
    assert any("up to date" in line for line in progress)


def test_keys_rotate_without_restart(
    service: tuple[ServiceSpec, ServiceRecord, list[str]], docker_client: Any
) -> None:
    spec, record, _ = service
    started = docker_client.api.inspect_container(record.target_data["container_id"])["State"][
        "StartedAt"
    ]
    old = keys(spec)
    path = spec.workdir / "secrets" / "keys.json"
    tmp = path.with_name("keys.json.new")
    tmp.write_text(json.dumps({"primary": "rotated-primary-key", "secondary": old["secondary"]}))
    os.replace(tmp, path)  # atomic, as the contract asks; the bind mount is the folder
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and score(record, "rotated-primary-key").status_code != 200:
        time.sleep(0.2)
    assert score(record, "rotated-primary-key").status_code == 200
    assert score(record, old["primary"]).status_code == 401
    assert score(record, old["secondary"]).status_code == 200
    after = docker_client.api.inspect_container(record.target_data["container_id"])["State"]
    assert after["StartedAt"] == started and after["Running"]


def test_status_and_logs(
    service: tuple[ServiceSpec, ServiceRecord, list[str]], docker_target: DockerTarget
) -> None:
    _, record, _ = service
    status = docker_target.status(record)
    assert status.state == "healthy", status
    lines = list(docker_target.logs(record, follow=False))
    assert lines, "the server logs something at start"


def test_delete_removes_container_and_service_image(
    make_spec: SpecFactory, docker_target: DockerTarget, docker_client: Any, tmp_path: Path
) -> None:
    import docker.errors

    # a distinct source dir makes a distinct image that only this service uses
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "score.py").write_text(
        "import json, os\n"
        "def init():\n    global seen\n    seen = sorted(os.listdir(os.environ['AZUREML_MODEL_DIR']))\n"
        "def run(data):\n    return {'files': seen}\n"
    )
    from modelfleet.deployer.targets.base import InferenceConfig

    spec = make_spec(
        inference=InferenceConfig(source_directory=tmp_path / "src", entry_script="score.py")
    )
    progress: list[str] = []
    record = docker_target.deploy(spec, progress.append)
    assert any(line.startswith("Step ") for line in progress), "the build stream is shown"
    try:
        answer = score(record, keys(spec)["primary"])
        assert answer.status_code == 200, answer.text
        assert "model.onnx" in answer.text
    finally:
        progress.clear()
        docker_target.delete(record, progress.append)
    assert containers_of(docker_client, spec.name) == []
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(record.target_data["image"])
    assert docker_target.status(record).state == "failed"
    # deleting twice is harmless
    docker_target.delete(record, progress.append)
    assert any("already gone" in line for line in progress)


def test_two_services_run_side_by_side(make_spec: SpecFactory, deployed: Deployed) -> None:
    a = deployed.deploy(make_spec())
    b = deployed.deploy(make_spec())
    assert a.target_data["port"] != b.target_data["port"]
    assert a.target_data["image"] == b.target_data["image"], "same content, same image"
    for record in (a, b):
        assert (
            httpx.get(f"http://127.0.0.1:{record.target_data['port']}/", timeout=5).status_code
            == 200
        )


def test_logs_follow_streams_until_the_container_stops(
    make_spec: SpecFactory, deployed: Deployed, docker_target: DockerTarget, docker_client: Any
) -> None:
    import threading

    record = deployed.deploy(make_spec())
    lines: list[str] = []
    first = threading.Event()

    def follow() -> None:
        for line in docker_target.logs(record, follow=True):
            lines.append(line)
            first.set()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    assert first.wait(15), "following starts with the lines already written"
    assert reader.is_alive(), "follow keeps the stream open while the container runs"
    docker_client.containers.get(record.target_data["container_id"]).stop(timeout=10)
    reader.join(15)
    assert not reader.is_alive(), "the stream ends when the container stops"
    status = docker_target.status(record)
    assert status.state == "failed"
    assert status.last_log_lines, "a stopped service shows its last log lines"


def test_several_models_are_laid_out_as_azureml_does(
    make_spec: SpecFactory,
    deployed: Deployed,
    digits_onnx: Path,
    digits_onnx_v2: Path,
    tmp_path: Path,
) -> None:
    from docker_helpers import binding

    from modelfleet.deployer.targets.base import InferenceConfig

    src = tmp_path / "multi"
    src.mkdir()
    (src / "score.py").write_text(
        "import json, os\n"
        "import numpy as np\n"
        "import onnxruntime as ort\n\n"
        "def init():\n"
        "    global sessions\n"
        "    root = os.environ['AZUREML_MODEL_DIR']\n"
        "    sessions = {n: ort.InferenceSession(os.path.join(root, n, v, 'model.onnx'))\n"
        "                for n, v in [('digits', '1'), ('digits-b', '2')]}\n\n"
        "def run(data):\n"
        "    if isinstance(data, (str, bytes)):\n"
        "        data = json.loads(data)\n"
        "    x = np.asarray(data['data'], dtype=np.float32)\n"
        "    return {n: s.run(None, {s.get_inputs()[0].name: x})[0].tolist() for n, s in sessions.items()}\n"
    )
    spec = make_spec(
        models=(binding(digits_onnx, 1), binding(digits_onnx_v2, 2, name="digits-b")),
        inference=InferenceConfig(source_directory=src, entry_script="score.py"),
    )
    record = deployed.deploy(spec)
    assert record.models == ["digits:1", "digits-b:2"]
    answer = score(record, keys(spec)["primary"], rows=3)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"digits", "digits-b"}
    assert body["digits"] == [0, 1, 2] and body["digits-b"] == [0, 1, 2]


def test_server_runs_as_an_unprivileged_user_that_alone_reads_the_keys(
    make_spec: SpecFactory, deployed: Deployed, docker_client: Any
) -> None:
    import stat

    from modelfleet.deployer.docker_images import CONTAINER_UID
    from modelfleet.deployer.targets.service_files import write_atomic

    spec = make_spec()
    record = deployed.deploy(spec)
    container = docker_client.containers.get(record.target_data["container_id"])
    assert container.attrs["Config"]["User"] == f"{CONTAINER_UID}:{CONTAINER_UID}"
    # the server process itself (the child of docker-init), not only `docker exec`
    code, out = container.exec_run(
        ["sh", "-c", "id -u; id -un; for p in /proc/[0-9]*; do "
         "grep -q modelfleet.scoring $p/cmdline 2>/dev/null && stat -c %u $p; done"]
    )  # fmt: skip
    assert code == 0, out
    lines = out.decode().split()
    assert lines[0] == str(CONTAINER_UID) and lines[1] == "modelfleet"
    assert lines[2:] and set(lines[2:]) == {str(CONTAINER_UID)}, lines
    for path, mode in [
        (spec.workdir / "secrets", 0o700),
        (spec.workdir / "secrets" / "keys.json", 0o600),
        (spec.workdir / "secrets" / "admin.key", 0o600),
    ]:
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (CONTAINER_UID, mode), path
    # it reads its keys, cannot change the mounted workdir, owns its releases
    code, out = container.exec_run(
        ["sh", "-c", "cat /var/modelfleet/service/secrets/keys.json >/dev/null && "
         "! touch /var/modelfleet/service/x 2>/dev/null && test -w /var/modelfleet/releases"]
    )  # fmt: skip
    assert code == 0, out
    assert score(record, keys(spec)["primary"]).status_code == 200

    # What `service regen-key` does: root rewrites the file atomically on the host.
    # The new file keeps the server's ownership, and the server takes it with no restart.
    started = docker_client.api.inspect_container(record.target_data["container_id"])["State"]
    old = keys(spec)
    path = spec.workdir / "secrets" / "keys.json"
    write_atomic(path, json.dumps({"primary": old["primary"], "secondary": "regenerated-key-2"}))
    assert (path.stat().st_uid, stat.S_IMODE(path.stat().st_mode)) == (CONTAINER_UID, 0o600)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and score(record, "regenerated-key-2").status_code != 200:
        time.sleep(0.2)
    assert score(record, "regenerated-key-2").status_code == 200
    assert score(record, old["secondary"]).status_code == 401
    after = docker_client.api.inspect_container(record.target_data["container_id"])["State"]
    assert after["StartedAt"] == started["StartedAt"] and after["Running"]


def test_delete_of_an_interrupted_deploy_removes_its_container_and_image(
    make_spec: SpecFactory, docker_target: DockerTarget, docker_client: Any, tmp_path: Path
) -> None:
    """A CLI killed before it recorded the deploy leaves a row with only the workdir."""
    import docker.errors

    from modelfleet.deployer.targets.base import InferenceConfig, ServiceRecord

    (tmp_path / "src").mkdir()  # an image only this service uses
    (tmp_path / "src" / "score.py").write_text(
        f"# {tmp_path.name}\ndef init():\n    pass\ndef run(data):\n    return data\n"
    )
    spec = make_spec(
        inference=InferenceConfig(source_directory=tmp_path / "src", entry_script="score.py")
    )
    record = docker_target.deploy(spec, lambda _line: None)
    stale = ServiceRecord(
        spec.name, "docker", "creating", target_data={"workdir": str(spec.workdir.resolve())}
    )
    try:
        docker_target.delete(stale, lambda _line: None)
        assert containers_of(docker_client, spec.name) == []
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(record.target_data["image"])
    finally:
        docker_target.delete(record, lambda _line: None)


def test_an_image_built_by_a_deploy_killed_before_its_container_goes_with_the_takeover(
    make_spec: SpecFactory, docker_target: DockerTarget, docker_client: Any, tmp_path: Path
) -> None:
    """Killed between the image build and the container start: no container names the
    image and the claimed record holds only the workdir; the workdir's note finds it."""
    import docker.errors

    from modelfleet.deployer.targets.base import InferenceConfig
    from modelfleet.deployer.targets.docker import IMAGES_FILE

    src = tmp_path / "src"  # content of its own, so that no other service shares the image
    src.mkdir()
    (src / "score.py").write_text(
        f"# {uuid.uuid4()}\ndef init():\n    pass\n\ndef run(d):\n    return d\n"
    )
    spec = make_spec(inference=InferenceConfig(source_directory=src, entry_script="score.py"))
    spec.workdir.mkdir(parents=True)
    # what the killed deploy did: build the image, start no container, record nothing
    tag, _release, built = docker_target.build(spec, lambda _line: None)
    assert built
    assert (spec.workdir / IMAGES_FILE).read_text().split() == [tag]
    try:
        claimed = ServiceRecord(
            spec.name, "docker", "creating", target_data={"workdir": str(spec.workdir.resolve())}
        )
        progress: list[str] = []
        docker_target.delete(claimed, progress.append)  # what the takeover runs
        assert f"removed image {tag}" in progress
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(tag)
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(tag)


def test_the_images_note_names_only_service_images(
    make_spec: SpecFactory, docker_target: DockerTarget, docker_client: Any
) -> None:
    """A line that is not a service image (the workdir is the user's to edit) removes nothing."""
    from modelfleet.deployer.docker_images import ensure_base_image
    from modelfleet.deployer.targets.docker import IMAGES_FILE

    base = ensure_base_image(docker_client)
    spec = make_spec()
    spec.workdir.mkdir(parents=True)
    (spec.workdir / IMAGES_FILE).write_text(f"{base}\n")
    claimed = ServiceRecord(
        spec.name, "docker", "creating", target_data={"workdir": str(spec.workdir)}
    )
    docker_target.delete(claimed, lambda _line: None)
    docker_client.images.get(base)  # still there
