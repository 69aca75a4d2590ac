"""A custom base image and user requirements, both installed with no network."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from docker_helpers import Deployed, SpecFactory

from modelfleet.deployer.docker_images import build_image, ensure_base_image
from modelfleet.deployer.targets.base import InferenceConfig

pytestmark = pytest.mark.docker

CUSTOM_BASE = "modelfleet/test-custom-base:1"


def custom_base(client: Any) -> str:
    """A base image of the user's own: ours plus a marker file (kept as a cache)."""
    import tarfile

    base_id = client.images.get(ensure_base_image(client)).id
    try:
        if client.images.get(CUSTOM_BASE).labels.get("from") == base_id:
            return CUSTOM_BASE
    except Exception:  # not built yet
        pass
    dockerfile = f"FROM {base_id}\nRUN echo corporate-base > /etc/custom-base\n".encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
    buffer.seek(0)
    build_image(client, buffer, CUSTOM_BASE, {"from": base_id}, lambda _line: None)
    return CUSTOM_BASE


def test_custom_base_image_and_requirements_are_used(
    make_spec: SpecFactory, deployed: Deployed, docker_client: Any, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "score.py").write_text(
        "import tabulate\n\n"
        "def init():\n"
        "    global marker\n"
        "    marker = open('/etc/custom-base').read().strip()\n\n"
        "def run(data):\n"
        "    return {'tabulate': tabulate.__version__, 'base': marker}\n"
    )
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("tabulate==0.9.0\n")
    spec = make_spec(
        inference=InferenceConfig(
            source_directory=src,
            entry_script="score.py",
            requirements_file=reqs,
            base_image=custom_base(docker_client),
        )
    )
    record = deployed.deploy(spec)
    keys = json.loads((spec.workdir / "secrets" / "keys.json").read_text())
    assert record.scoring_uri
    answer = httpx.post(
        record.scoring_uri,
        json={"data": [[0.0]]},
        headers={"Authorization": f"Bearer {keys['primary']}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body == {"tabulate": "0.9.0", "base": "corporate-base"}, body
