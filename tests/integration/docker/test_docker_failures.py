"""Bad input and failing containers: clear errors, nothing left behind."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from docker_helpers import SpecFactory, binding, containers_of

from modelfleet.deployer.errors import DeploymentError
from modelfleet.deployer.targets.base import DeploymentConfig, InferenceConfig
from modelfleet.deployer.targets.docker import DockerTarget

pytestmark = pytest.mark.docker


def script_dir(tmp_path: Path, body: str) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "score.py").write_text(body)
    return src


def test_container_that_crashes_at_start_is_reported_with_its_logs_and_removed(
    make_spec: SpecFactory, docker_target: DockerTarget, docker_client: Any, tmp_path: Path
) -> None:
    src = script_dir(
        tmp_path,
        "def init():\n    raise RuntimeError('weights missing: crash-at-start')\n\n"
        "def run(data):\n    return data\n",
    )
    spec = make_spec(inference=InferenceConfig(source_directory=src, entry_script="score.py"))
    progress: list[str] = []
    with pytest.raises(DeploymentError) as err:
        docker_target.deploy(spec, progress.append)
    message = str(err.value)
    assert "exited during start" in message
    assert "weights missing: crash-at-start" in message, "the last log lines are shown"
    assert containers_of(docker_client, spec.name) == []
    built = [line.split()[-1] for line in progress if line.startswith("building image ")]
    assert built, progress
    import docker.errors

    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(built[0])


def test_syntax_error_in_entry_script_fails_before_any_build(
    make_spec: SpecFactory, docker_target: DockerTarget, docker_client: Any, tmp_path: Path
) -> None:
    src = script_dir(tmp_path, "def init():\n    pass\n\ndef run(data)\n    return data\n")
    spec = make_spec(inference=InferenceConfig(source_directory=src, entry_script="score.py"))
    progress: list[str] = []
    with pytest.raises(DeploymentError, match=r"score.py line 4: .*def run\(data\)"):
        docker_target.deploy(spec, progress.append)
    assert progress == []
    assert containers_of(docker_client, spec.name) == []


def test_missing_entry_script_is_named(
    make_spec: SpecFactory, docker_target: DockerTarget, tmp_path: Path
) -> None:
    src = script_dir(tmp_path, "")
    spec = make_spec(inference=InferenceConfig(source_directory=src, entry_script="nope.py"))
    with pytest.raises(
        DeploymentError, match=r"entry script nope.py not found in source directory"
    ):
        docker_target.deploy(spec, lambda _line: None)


def test_port_already_taken_is_named_and_leaves_no_container(
    make_spec: SpecFactory, docker_target: DockerTarget, docker_client: Any
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec = make_spec(deployment=DeploymentConfig(port=port, cpu_cores=0.5, memory_gb=0.5))
        with pytest.raises(DeploymentError, match=rf"port {port} on 127.0.0.1 is already in use"):
            docker_target.deploy(spec, lambda _line: None)
    assert containers_of(docker_client, spec.name) == []


def test_missing_base_image_is_not_pulled(
    make_spec: SpecFactory, docker_target: DockerTarget
) -> None:
    spec = make_spec(inference=InferenceConfig(base_image="modelfleet/no-such-image:1"))
    with pytest.raises(
        DeploymentError, match=r"not present in the local Docker engine; images are never pulled"
    ):
        docker_target.deploy(spec, lambda _line: None)


def test_missing_model_file_is_named(
    make_spec: SpecFactory, docker_target: DockerTarget, digits_onnx: Path, tmp_path: Path
) -> None:
    gone = tmp_path / "gone.onnx"
    gone.write_bytes(digits_onnx.read_bytes())
    model = binding(gone)
    gone.unlink()
    spec = make_spec(models=(model,))
    with pytest.raises(DeploymentError, match=r"model file .*gone.onnx of digits:1 is missing"):
        docker_target.deploy(spec, lambda _line: None)


def test_existing_container_of_that_name_is_not_replaced(
    make_spec: SpecFactory, docker_target: DockerTarget, docker_client: Any
) -> None:
    from modelfleet.deployer.docker_images import ensure_base_image

    spec = make_spec()
    other = docker_client.containers.create(
        ensure_base_image(docker_client), command="true", name=f"modelfleet-{spec.name}"
    )
    try:
        with pytest.raises(DeploymentError, match=r"already exists; delete the service first"):
            docker_target.deploy(spec, lambda _line: None)
        other.reload()  # still there, untouched
    finally:
        other.remove(force=True)


def test_container_killed_for_memory_names_the_limit(
    make_spec: SpecFactory, docker_target: DockerTarget, docker_client: Any, tmp_path: Path
) -> None:
    src = script_dir(
        tmp_path,
        "def init():\n    global hog\n    hog = bytearray(256 * 1024 * 1024)\n    hog[::4096] = b'x' * len(hog[::4096])\n\n"
        "def run(data):\n    return data\n",
    )
    spec = make_spec(
        inference=InferenceConfig(source_directory=src, entry_script="score.py"),
        deployment=DeploymentConfig(cpu_cores=0.5, memory_gb=0.125),
    )
    with pytest.raises(DeploymentError, match="killed for exceeding its memory limit") as err:
        docker_target.deploy(spec, lambda _line: None)
    assert "memory_gb" in err.value.hint
    assert containers_of(docker_client, spec.name) == []


def test_base_image_build_without_root_says_what_to_do(
    docker_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelfleet.deployer import docker_images

    monkeypatch.setattr(docker_images, "default_base_image_tag", lambda: "modelfleet/base:absent")
    monkeypatch.setattr(docker_images.os, "geteuid", lambda: 1000)
    with pytest.raises(DeploymentError, match="needs root") as err:
        docker_images.ensure_base_image(docker_client)
    assert "--base-image" in str(err.value)


def test_ready_timeout_set_after_import_bounds_the_wait(
    make_spec: SpecFactory,
    docker_target: DockerTarget,
    docker_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    src = script_dir(
        tmp_path,
        "import time\n\ndef init():\n    time.sleep(120)\n\ndef run(data):\n    return data\n",
    )
    spec = make_spec(inference=InferenceConfig(source_directory=src, entry_script="score.py"))
    monkeypatch.setenv("MODELFLEET_DOCKER_READY_TIMEOUT", "2")
    started = time.monotonic()
    with pytest.raises(DeploymentError, match="not ready after 2s") as err:
        docker_target.deploy(spec, lambda _line: None)
    assert "MODELFLEET_DOCKER_READY_TIMEOUT" in err.value.hint
    assert time.monotonic() - started < 60, "the 2 s bound, not the 120 s default"
    assert containers_of(docker_client, spec.name) == []


def test_keys_that_cannot_be_given_to_the_server_user_stop_the_deploy(
    make_spec: SpecFactory,
    docker_target: DockerTarget,
    docker_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from modelfleet.deployer.targets import docker as docker_target_module

    def not_root(*_args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    # as for a deployer that is not root (a docker group member)
    monkeypatch.setattr(docker_target_module.os, "chown", not_root)
    spec = make_spec()
    with pytest.raises(DeploymentError, match=r"cannot hand the service's keys to the container "
                       r"user \(uid 10001\): .*Operation not permitted") as err:  # fmt: skip
        docker_target.deploy(spec, lambda _line: None)
    assert "run the docker target as root" in err.value.hint
    assert containers_of(docker_client, spec.name) == []
