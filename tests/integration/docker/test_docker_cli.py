"""`modelfleet` run as a user would, against a temporary $MODELFLEET_HOME and a real engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from docker_helpers import containers_of

from modelfleet.deployer.samples import digits_rows

pytestmark = pytest.mark.docker

MODELFLEET = str(Path(sys.executable).with_name("modelfleet"))


def run(home: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODELFLEET_HOME": str(home)}
    result = subprocess.run(
        [MODELFLEET, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    if ok:
        assert result.returncode == 0, f"{args}: {result.stderr}"
    return result


def test_cli_deploys_calls_updates_and_deletes_a_docker_service(
    tmp_path: Path, digits_onnx: Path, digits_onnx_v2: Path, docker_client: Any
) -> None:
    home = tmp_path / "home"
    svc = f"cli-docker-{uuid.uuid4().hex[:6]}"  # concurrent test runs share one engine
    run(home, "model", "register", "-n", "digits", "-p", str(digits_onnx))
    run(home, "model", "register", "-n", "digits", "-p", str(digits_onnx_v2))
    dc = tmp_path / "deploymentconfig.json"
    dc.write_text(
        json.dumps(
            {
                "computeType": "docker",
                "containerResourceRequirements": {"cpu": 0.25, "memoryInGB": 0.5},
                "authEnabled": True,
                "numReplicas": 2,
                "autoScaler": {"autoscaleEnabled": True, "maxReplicas": 4},
            }
        )
    )
    body = json.dumps({"data": digits_rows(2)})
    # --cpu-cores overrides the file's cpu; memory comes from the file
    deployed = run(home, "deploy", svc, "-m", "digits:1", "-dc", str(dc), "--cpu-cores", "0.5",
                   "-o", "json")  # fmt: skip
    try:
        view = json.loads(deployed.stdout)
        assert view["target"] == "docker" and view["state"] == "healthy"
        host = docker_client.api.inspect_container(view["container_name"])["HostConfig"]
        assert host["NanoCpus"] == 500_000_000 and host["Memory"] == 512 * 1024 * 1024
        # numReplicas 2: two workers in the one container; autoScaler noted, not applied
        note = (
            "autoScaler ignored: the docker target runs a fixed number of worker processes "
            "in one container (numReplicas, here 2), sharing its cpu/memory limits"
        )
        assert view["workers"] == 2 and view["note"] == note

        called = json.loads(run(home, "service", "call", svc, "-d", body, "-o", "json").stdout)
        assert called["status_code"] == 200 and called["model_version"] == "1"
        assert called["body"]["label"] == [0, 1]
        listed = json.loads(run(home, "service", "list", "-o", "json").stdout)
        assert [(s["name"], s["target"], s["state"]) for s in listed] == [(svc, "docker", "healthy")]
        refused = run(home, "service", "call", svc, "-d", body, "--no-auth", ok=False)
        assert refused.returncode != 0 and "401" in refused.stderr
        assert "Traceback" not in refused.stderr

        run(home, "service", "regen-key", svc, "--key", "primary")
        deadline = time.monotonic() + 15
        while run(home, "service", "call", svc, "-d", body, ok=False).returncode != 0:
            assert time.monotonic() < deadline, "the rotated key is accepted without a restart"
            time.sleep(0.3)

        run(home, "service", "update", svc, "-m", "digits:2")
        called = json.loads(run(home, "service", "call", svc, "-d", body, "-o", "json").stdout)
        assert called["model_version"] == "2"
        shown = json.loads(run(home, "service", "show", svc, "-o", "json").stdout)
        assert shown["state"] == "healthy" and shown["models"] == ["digits:2"]
        assert shown["workers"] == 2 and shown["note"] == note
        assert run(home, "service", "logs", svc).stdout.strip()
    finally:
        deleted = run(home, "service", "delete", svc, ok=False)
    assert deleted.returncode == 0, deleted.stderr
    assert containers_of(docker_client, svc) == []
    assert json.loads(run(home, "service", "list", "-o", "json").stdout) == []


def test_cli_docker_deploy_with_missing_base_image_fails_cleanly(
    tmp_path: Path, digits_onnx: Path, docker_client: Any
) -> None:
    home = tmp_path / "home"
    svc = f"cli-nobase-{uuid.uuid4().hex[:6]}"
    run(home, "model", "register", "-n", "digits", "-p", str(digits_onnx))
    failed = run(
        home, "deploy", svc, "-m", "digits:1", "--target", "docker",
        "--base-image", "modelfleet/absent:0", ok=False,
    )  # fmt: skip
    assert failed.returncode != 0
    assert "error: base image 'modelfleet/absent:0' is not present" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert json.loads(run(home, "service", "list", "-o", "json").stdout) == []
    assert containers_of(docker_client, svc) == []


def test_cli_docker_base_image_prepares_cached_images(tmp_path: Path, docker_client: Any) -> None:
    home = tmp_path / "home"
    view = json.loads(run(home, "docker", "base-image", "-o", "json").stdout)
    for key in ("base_image", "runtime_image"):
        labels = docker_client.images.get(view[key]).labels
        assert labels["modelfleet.kind"] == key.split("_")[0]
    assert Path(view["wheelhouse"], "requirements.txt").is_file()
    bad = run(home, "docker", "base-image", "--base-image", "modelfleet/absent:0", ok=False)
    assert bad.returncode != 0
    assert "images are never pulled" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_inference_config_extra_dockerfile_steps(
    tmp_path: Path, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    home = tmp_path / "home"
    svc = f"cli-steps-{uuid.uuid4().hex[:6]}"
    run(home, "model", "register", "-n", "digits", "-p", str(digits_onnx))
    run(home, "model", "register", "-n", "digits", "-p", str(digits_onnx_v2))
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "score.py").write_text(
        "import os\n\ndef init():\n    pass\n\n"
        "def run(data):\n    return {'foo': os.environ['FOO'], 'tool': open('/etc/tool').read()}\n"
    )
    (project / "src" / "tool.txt").write_text("from-source")
    (project / "steps.docker").write_text("ENV FOO=bar\nCOPY tool.txt /etc/tool\n")
    ic = project / "inferenceconfig.json"
    ic.write_text(
        json.dumps(
            {
                "entryScript": "score.py",
                "sourceDirectory": "src",
                "extraDockerfileSteps": "steps.docker",  # relative to this file, as Azure ML
            }
        )
    )
    body = json.dumps({"data": [[0.0]]})
    run(home, "deploy", svc, "-m", "digits:1", "-ic", str(ic), "--target", "docker")
    try:
        answer = json.loads(run(home, "service", "call", svc, "-d", body).stdout)
        assert answer == {"foo": "bar", "tool": "from-source"}, answer
        # unchanged steps: the update hot-swaps as usual
        run(home, "service", "update", svc, "-m", "digits:2")
        shown = json.loads(run(home, "service", "show", svc, "-o", "json").stdout)
        assert shown["models"] == ["digits:2"] and shown["state"] == "healthy"
    finally:
        run(home, "service", "delete", svc)

    (project / "steps.docker").write_text("ENV FOO=bar\nRUN exit 3\n")
    failed = run(home, "deploy", svc, "-m", "digits:1", "-ic", str(ic), "--target", "docker",
                 ok=False)  # fmt: skip
    assert failed.returncode != 0
    assert "extraDockerfileSteps steps.docker line 2: RUN exit 3" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert json.loads(run(home, "service", "list", "-o", "json").stdout) == []
