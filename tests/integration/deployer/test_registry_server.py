"""The artifact HTTP server (contract section 3) over a real socket: auth, Range, 416, 404."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from modelfleet.agent.modelref import ModelVersionRef
from modelfleet.deployer.registry import ModelVersion, Registry
from modelfleet.deployer.registry.server import ArtifactServer

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def served(tmp_path: Path, digits_onnx: Path) -> Iterator[tuple[ArtifactServer, ModelVersion]]:
    registry = Registry(tmp_path / "home")
    model = registry.register("digits", digits_onnx).model
    with ArtifactServer(registry, token=TOKEN) as server:
        yield server, model


def test_download_needs_the_token_and_carries_the_digest(
    served: tuple[ArtifactServer, ModelVersion], digits_onnx: Path
) -> None:
    server, model = served
    url = f"{server.url}/v1/artifacts/{model.sha256}"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    got = httpx.get(url, headers=AUTH)
    assert got.status_code == 200
    assert got.content == digits_onnx.read_bytes()
    assert got.headers["x-content-sha256"] == model.sha256
    assert got.headers["etag"] == f'"{model.sha256}"'
    assert got.headers["accept-ranges"] == "bytes"
    assert int(got.headers["content-length"]) == model.size
    head = httpx.head(url, headers=AUTH)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == model.size
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_single_ranges_resume_a_download(served: tuple[ArtifactServer, ModelVersion]) -> None:
    server, model = served
    url = f"{server.url}/v1/artifacts/{model.sha256}"
    full = httpx.get(url, headers=AUTH).content
    part = httpx.get(url, headers={**AUTH, "Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-199/{model.size}"
    assert part.content == full[100:200]
    rest = httpx.get(url, headers={**AUTH, "Range": "bytes=1000-"})
    assert rest.status_code == 206 and rest.content == full[1000:]
    suffix = httpx.get(url, headers={**AUTH, "Range": "bytes=-10"})
    assert suffix.status_code == 206 and suffix.content == full[-10:]
    assert hashlib.sha256(full[:1000] + rest.content).hexdigest() == model.sha256


def test_unsatisfiable_range_is_416_and_unknown_digest_404(
    served: tuple[ArtifactServer, ModelVersion],
) -> None:
    server, model = served
    url = f"{server.url}/v1/artifacts/{model.sha256}"
    bad = httpx.get(url, headers={**AUTH, "Range": f"bytes={model.size}-"})
    assert bad.status_code == 416
    assert bad.headers["content-range"] == f"bytes */{model.size}"
    missing = httpx.get(f"{server.url}/v1/artifacts/{'0' * 64}", headers=AUTH)
    assert missing.status_code == 404
    assert httpx.get(f"{server.url}/v1/artifacts/not-a-digest", headers=AUTH).status_code == 404


def test_model_endpoint_returns_a_model_version_ref(
    served: tuple[ArtifactServer, ModelVersion],
) -> None:
    server, model = served
    assert httpx.get(f"{server.url}/v1/models/digits/1").status_code == 401
    body = httpx.get(f"{server.url}/v1/models/digits/1", headers=AUTH).json()
    ref = ModelVersionRef.from_dict(body)
    assert ref.key == "digits:1" and ref.sha256 == model.sha256 and ref.size == model.size
    assert ref.url == f"{server.url}/v1/artifacts/{model.sha256}"
    assert httpx.get(ref.url, headers=AUTH).status_code == 200
    missing = httpx.get(f"{server.url}/v1/models/digits/9", headers=AUTH)
    assert missing.status_code == 404 and "has no version 9" in missing.json()["error"]


def test_a_taken_port_is_a_clear_error(served: tuple[ArtifactServer, ModelVersion]) -> None:
    from modelfleet.deployer.errors import DeployerError

    server, _ = served
    with pytest.raises(DeployerError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        ArtifactServer(server.registry, port=server.port).start()


def test_an_unreadable_database_is_a_503_naming_it_and_artifacts_still_serve(
    served: tuple[ArtifactServer, ModelVersion], digits_onnx: Path
) -> None:
    server, model = served
    db = server.registry.db_path
    for stale in db.parent.glob("registry.db-*"):  # WAL files would outlive the damage
        stale.unlink()
    db.write_bytes(b"not a database" * 512)
    answer = httpx.get(f"{server.url}/v1/models/digits/1", headers=AUTH)
    assert answer.status_code == 503
    assert "is unreadable: file is not a database" in answer.json()["error"]
    blob = httpx.get(f"{server.url}/v1/artifacts/{model.sha256}", headers=AUTH)
    assert blob.status_code == 200 and blob.content == digits_onnx.read_bytes()
