"""Staging a release (models + source) for a service image, and engine-less errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfleet.deployer.docker_images import ModelSource, stage_release
from modelfleet.deployer.errors import DeploymentError


def model_file(tmp_path: Path, name: str, data: bytes = b"onnx-bytes") -> Path:
    path = tmp_path / "models" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_one_model_is_the_model_dir(tmp_path: Path) -> None:
    m = ModelSource("digits", 3, model_file(tmp_path, "model.onnx"), "onnx")
    release = stage_release(tmp_path / "svc", [m], None, None, "svc")
    assert (release.path / "model" / "model.onnx").read_bytes() == b"onnx-bytes"
    assert release.model_name == "digits" and release.model_version == "3"
    assert release.entry_script is None
    assert release.model_dir == f"/var/modelfleet/releases/{release.id}/model"
    env = (release.path / "release.env").read_text()
    assert "ENTRY_SCRIPT=''" in env and "MODEL_NAME='digits'" in env
    assert "MODEL_VERSION='3'" in env


def test_several_models_sit_under_name_and_version(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "score.py").write_text("def init():\n    pass\n")
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "junk.pyc").write_bytes(b"x")
    models = [
        ModelSource("a", 1, model_file(tmp_path, "a.onnx"), "onnx"),
        ModelSource("b", 2, model_file(tmp_path, "b.onnx", b"other"), "onnx"),
    ]
    release = stage_release(tmp_path / "svc", models, src, "score.py", "multi")
    assert (release.path / "model" / "a" / "1" / "a.onnx").is_file()
    assert (release.path / "model" / "b" / "2" / "b.onnx").read_bytes() == b"other"
    assert not (release.path / "app" / "__pycache__").exists()
    assert release.entry_script == f"/var/modelfleet/releases/{release.id}/app/score.py"
    assert release.model_name == "multi" and release.model_version == "a.1+b.2"


def test_release_id_follows_content_only(tmp_path: Path) -> None:
    m1 = ModelSource("digits", 1, model_file(tmp_path, "model.onnx"), "onnx")
    first = stage_release(tmp_path / "one", [m1], None, None, "svc")
    again = stage_release(tmp_path / "two", [m1], None, None, "svc")
    assert first.id == again.id
    m2 = ModelSource("digits", 1, model_file(tmp_path, "model2.onnx", b"changed"), "onnx")
    assert stage_release(tmp_path / "one", [m2], None, None, "svc").id != first.id
    m3 = ModelSource("digits", 3, m1.path, "onnx")  # same bytes, another version
    assert stage_release(tmp_path / "one", [m3], None, None, "svc").id != first.id


def test_blob_without_extension_gets_one_for_no_code_mode(tmp_path: Path) -> None:
    blob = model_file(tmp_path, "9f86d081884c7d65")
    release = stage_release(
        tmp_path / "svc", [ModelSource("m", 1, blob, "tflite")], None, None, "s"
    )
    assert (release.path / "model" / "model.tflite").is_file()


def test_bad_inputs_are_named_and_leave_no_staging(tmp_path: Path) -> None:
    missing = ModelSource("digits", 1, tmp_path / "nope.onnx", "onnx")
    with pytest.raises(DeploymentError, match=r"model file .*nope.onnx of digits:1 is missing"):
        stage_release(tmp_path / "svc", [missing], None, None, "svc")
    ok = ModelSource("digits", 1, model_file(tmp_path, "model.onnx"), "onnx")
    with pytest.raises(DeploymentError, match=r"source directory .*absent does not exist"):
        stage_release(tmp_path / "svc", [ok], tmp_path / "absent", "score.py", "svc")
    with pytest.raises(DeploymentError, match="at least one model"):
        stage_release(tmp_path / "svc", [], None, None, "svc")
    assert list((tmp_path / "svc" / "releases").iterdir()) == []


def test_unreachable_engine_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelfleet.deployer.targets.base import DeploymentConfig, InferenceConfig, ServiceSpec
    from modelfleet.deployer.targets.docker import DockerTarget

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    spec = ServiceSpec("svc", (), InferenceConfig(), DeploymentConfig(), tmp_path / "svc")
    with pytest.raises(DeploymentError, match="no Docker engine reachable") as err:
        DockerTarget().deploy(spec, lambda _line: None)
    assert "start dockerd" in err.value.hint
