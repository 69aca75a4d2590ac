"""Builds leave no untagged images behind, and old dependency images are pruned.

The runtime images here are built from a tiny stand-in wheelhouse (no
packages) on a base image of this test's own, so they are quick to build and
the per-base pruning never touches the images other tests and services use.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelfleet.deployer import docker_images as images
from modelfleet.deployer.docker_images import ImageBuildError
from modelfleet.deployer.wheelhouse import Wheelhouse

pytestmark = pytest.mark.docker


def context(dockerfile: str) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def dangling(client: Any, label: str | None = None) -> set[str]:
    filters: dict[str, Any] = {"dangling": True}
    if label is not None:
        filters["label"] = label
    return {str(i) for i in client.api.images(filters=filters, quiet=True)}


def remove_tagged(client: Any, label: str) -> None:
    import docker.errors

    for image in client.images.list(filters={"label": label}):
        for tag in image.tags:
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(tag)


@pytest.fixture
def test_base(docker_client: Any) -> Iterator[str]:
    """Our base image plus a label unique to this test: its own pruning scope."""
    run = uuid.uuid4().hex[:10]
    tag = f"modelfleet/test-cache-base:{run}"
    base_id = docker_client.images.get(images.ensure_base_image(docker_client)).id
    images.build_image(
        docker_client,
        context(f"FROM {base_id}\nLABEL modelfleet.test-run={run}\n"),
        tag,
        {},
        lambda _line: None,
    )
    yield tag
    own_base = docker_client.images.get(tag).id
    remove_tagged(docker_client, f"{images.LABEL_BASE}={own_base}")
    docker_client.images.remove(tag)


def stand_in_wheelhouse(tmp_path: Path, n: int) -> Wheelhouse:
    path = tmp_path / f"wheelhouse-{n}"
    path.mkdir()
    # a comment makes each variant's dependency set distinct; pip installs nothing
    (path / "requirements.txt").write_text(f"# variant {n} {uuid.uuid4().hex}\n")
    return Wheelhouse(path, key=f"test-{uuid.uuid4().hex}")


def test_runtime_builds_leave_no_dangling_image_and_old_deps_images_go(
    docker_client: Any, test_base: str, tmp_path: Path
) -> None:
    # Every image built on our base carries its test-run label: only this test's
    # builds are counted, not those another process runs on the same engine.
    run = docker_client.images.get(test_base).labels["modelfleet.test-run"]
    ours = f"modelfleet.test-run={run}"
    before = dangling(docker_client, ours)
    built: list[tuple[str, str]] = []  # (runtime tag, deps image id)
    for n in range(images.RUNTIME_IMAGES_KEPT + 1):
        runtime = images.ensure_runtime_image(
            docker_client, test_base, stand_in_wheelhouse(tmp_path, n), None
        )
        labels = images.image_labels(docker_client, runtime)
        deps = docker_client.images.get(labels[images.LABEL_DEPS])
        assert any(t.startswith(images.DEPS_REPO + ":") for t in deps.tags), "deps image is tagged"
        built.append((runtime, deps.id))
        # the runtime image runs as built: the server's user exists in it
        out = docker_client.containers.run(runtime, ["id", "-u", "modelfleet"], remove=True)
        assert out.decode().strip() == str(images.CONTAINER_UID)
    assert dangling(docker_client, ours) - before == set(), "no build left an untagged image"

    import docker.errors

    # the newest runtime images stay; of the deps images only the newest, which
    # the next runtime build (a changed modelfleet-scoring) would start from
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(built[0][0])
    for runtime, _deps in built[1:]:
        docker_client.images.get(runtime)
    for _runtime, deps_id in built[:-1]:
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(deps_id)
    docker_client.images.get(built[-1][1])


def test_failed_build_removes_the_images_its_finished_steps_made(
    docker_client: Any, test_base: str
) -> None:
    import docker.errors

    run = uuid.uuid4().hex  # never a cache hit: each step below is new
    progress: list[str] = []
    with pytest.raises(ImageBuildError, match="returned a non-zero code"):
        images.build_image(
            docker_client,
            context(f"FROM {test_base}\nENV RUN={run}\nRUN echo {run} > /tmp/x\nRUN false\n"),
            f"modelfleet/test-cache-failed:{run[:10]}",
            {},
            progress.append,
        )
    committed = [
        line.split()[-1]
        for line in progress
        if line.startswith("---> ") and len(line.split()) == 2 and line != "---> Using cache"
    ]
    base_short = docker_client.images.get(test_base).short_id.split(":")[1]
    committed = [c for c in committed if not base_short.startswith(c)]
    assert len(committed) == 2, progress  # ENV and the first RUN
    for image in committed:
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(image)


def test_leftovers_of_earlier_builds_are_pruned_once_old_enough(
    docker_client: Any, test_base: str
) -> None:
    import docker.errors

    run = uuid.uuid4().hex[:10]
    label = f"{images.LABEL_KIND}=test-leftover-{run}"
    tag = f"modelfleet/test-leftover:{run}"

    def build(content: str) -> str:
        images.build_image(
            docker_client,
            context(f"FROM {test_base}\nLABEL {label}\nRUN echo {content} > /tmp/x\n"),
            tag,
            {},
            lambda _line: None,
        )
        return str(docker_client.images.get(tag).id)

    # Built again under the same tag, the first image is left untagged: a leftover.
    image_id = build("first")
    newer = build("second")
    assert image_id in dangling(docker_client)
    try:
        assert images.prune_build_leftovers(docker_client, label=label) == []
        docker_client.images.get(image_id)  # too young: could be a build in flight
        assert images.prune_build_leftovers(docker_client, min_age_s=0, label=label) == [image_id]
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(image_id)
    finally:
        for leftover in (tag, image_id):
            with contextlib.suppress(docker.errors.APIError):
                docker_client.api.remove_image(leftover)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(newer)
