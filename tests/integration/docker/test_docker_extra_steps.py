"""extraDockerfileSteps in a real build: steps land in the image, failures name the step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from docker_helpers import Deployed, SpecFactory, containers_of, primary_key

from modelfleet.deployer.docker_images import ImageBuildError, remove_image_if_unused
from modelfleet.deployer.errors import DeploymentError
from modelfleet.deployer.targets.base import InferenceConfig, ServiceRecord
from modelfleet.deployer.targets.docker import DockerTarget

pytestmark = pytest.mark.docker

SCORE = """\
import os, pathlib

def init():
    pass

def run(data):
    return {
        "foo": os.environ.get("FOO"),
        "marker": pathlib.Path("/etc/marker").read_text().strip(),
        "greeting": pathlib.Path("/etc/greeting").read_text().strip(),
    }
"""

STEPS = """\
# extra steps, as Azure ML's extraDockerfileSteps
ENV FOO=bar
RUN echo ok > /etc/marker
COPY data/greeting.txt /etc/greeting
"""


def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    (src / "score.py").write_text(SCORE)
    (src / "data" / "greeting.txt").write_text("hello from the source directory\n")
    return src


def call(record: ServiceRecord) -> dict[str, Any]:
    assert record.scoring_uri
    answer = httpx.post(
        record.scoring_uri,
        json={"data": [[0.0]]},
        headers={"Authorization": f"Bearer {primary_key(record)}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_steps_run_in_the_image_and_an_unchanged_file_is_not_rebuilt(
    make_spec: SpecFactory,
    deployed: Deployed,
    docker_target: DockerTarget,
    docker_client: Any,
    tmp_path: Path,
) -> None:
    src = source(tmp_path)
    steps = tmp_path / "steps.docker"
    steps.write_text(STEPS)
    inference = InferenceConfig(
        source_directory=src, entry_script="score.py", extra_dockerfile_steps=steps
    )
    spec = make_spec(inference=inference)
    record = deployed.deploy(spec)
    assert call(record) == {
        "foo": "bar",
        "marker": "ok",
        "greeting": "hello from the source directory",
    }

    progress: list[str] = []
    tag, _release, built = docker_target.build(spec, progress.append)
    assert (tag, built) == (record.target_data["image"], False), "same file: same image"

    steps.write_text(STEPS + "ENV EXTRA=1\n")
    changed, _release, built = docker_target.build(spec, lambda _line: None)
    try:
        assert built and changed != tag, "a changed file rebuilds"
        # A running container cannot take new steps: refused before touching it.
        with pytest.raises(DeploymentError, match="update changes the extraDockerfileSteps"):
            docker_target.update(record, spec, lambda _line: None)
        assert call(record)["foo"] == "bar"
    finally:
        remove_image_if_unused(docker_client, changed)


def test_failing_step_names_the_line_and_shows_the_build_log(
    make_spec: SpecFactory, docker_target: DockerTarget, docker_client: Any, tmp_path: Path
) -> None:
    src = source(tmp_path)
    steps = tmp_path / "steps.docker"
    steps.write_text("ENV FOO=bar\n\nRUN echo about-to-fail && \\\n    false\nRUN echo never\n")
    spec = make_spec(
        inference=InferenceConfig(
            source_directory=src, entry_script="score.py", extra_dockerfile_steps=steps
        )
    )
    progress: list[str] = []
    with pytest.raises(ImageBuildError) as err:
        docker_target.deploy(spec, progress.append)
    message = str(err.value)
    assert (
        "failed at extraDockerfileSteps steps.docker line 3: RUN echo about-to-fail && false"
        in message
    )
    assert "returned a non-zero code: 1" in message
    tail = message.split("\nbuild log tail:\n")[1].splitlines()
    assert "about-to-fail" in tail, "the step's own output is shown"
    assert "never" not in message
    assert "fix that step" in err.value.hint
    assert containers_of(docker_client, spec.name) == []
    built = [line.split()[-1] for line in progress if line.startswith("building image ")]
    import docker.errors

    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(built[0])


def test_missing_copy_source_is_reported_at_its_step(
    make_spec: SpecFactory, docker_target: DockerTarget, docker_client: Any, tmp_path: Path
) -> None:
    src = source(tmp_path)
    steps = tmp_path / "steps.docker"
    steps.write_text("COPY data/absent.txt /etc/absent\n")
    spec = make_spec(
        inference=InferenceConfig(
            source_directory=src, entry_script="score.py", extra_dockerfile_steps=steps
        )
    )
    with pytest.raises(ImageBuildError, match=r"line 1: COPY data/absent.txt /etc/absent: .*"):
        docker_target.deploy(spec, lambda _line: None)
    assert containers_of(docker_client, spec.name) == []
