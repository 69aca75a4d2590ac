"""Inference and deployment configs: Azure ML field names, flags win, errors name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelfleet.deployer.config import load_deployment_config, load_inference_config
from modelfleet.deployer.errors import ConfigError


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_azure_ml_inference_config_is_read_relative_to_its_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "score.py").write_text("def init():\n    pass\n")
    (tmp_path / "env.yml").write_text("dependencies: []\n")
    ic = _write(
        tmp_path / "inferenceconfig.json",
        {
            "entryScript": "score.py",
            "sourceDirectory": "src",
            "runtime": "python",
            "condaFile": "env.yml",
            "enableGpu": False,
            "baseImageRegistry": {"address": None},
        },
    )
    config = load_inference_config(ic)
    assert config.source_directory == src.resolve()
    assert config.entry_script == "score.py"
    assert config.conda_file == (tmp_path / "env.yml").resolve()


def test_bare_entry_script_gets_its_folder_as_source_directory(tmp_path: Path) -> None:
    (tmp_path / "score.py").write_text("")
    ic = _write(tmp_path / "ic.json", {"entryScript": "score.py", "runtime": "python"})
    config = load_inference_config(ic)
    assert config.source_directory == tmp_path.resolve() and config.entry_script == "score.py"


def test_deployment_config_fields_and_flag_overrides(tmp_path: Path) -> None:
    dc = _write(
        tmp_path / "deploymentconfig.json",
        {
            "computeType": "ACI",
            "containerResourceRequirements": {"cpu": 0.5, "memoryInGB": 2},
            "authEnabled": True,
            "primaryKey": "primary-key-1",
            "secondaryKey": "secondary-key-1",
            "scoringTimeoutMs": 5000,
            "maxConcurrentRequestsPerContainer": 4,
            "autoScaler": {"autoscaleEnabled": True, "minReplicas": 2, "maxReplicas": 4},
            "numReplicas": 2,
            "port": 8890,
            "appInsightsEnabled": False,
        },
    )
    config, target = load_deployment_config(dc, overrides={"port": 9000, "cpu": 1.5})
    assert target == "aci"
    assert (config.port, config.cpu_cores, config.memory_gb) == (9000, 1.5, 2.0)
    assert config.primary_key == "primary-key-1" and config.scoring_timeout_ms == 5000
    assert (config.autoscale_enabled, config.autoscale_min_replicas) == (True, 2)
    assert config.max_concurrent_requests == 4 and config.replicas == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"cpuCores": 1}, "dc.json: unknown field 'cpuCores'"),
        ({"containerResourceRequirements": {"cpu": "two"}},
         "dc.json: field 'containerResourceRequirements.cpu': expected a number > 0, got \"two\""),
        ({"containerResourceRequirements": {"gpus": 1}},
         "dc.json: unknown field 'containerResourceRequirements.gpus'"),
        ({"port": 70000}, "dc.json: field 'port': expected an integer between 1 and 65535"),
        ({"authEnabled": "yes"}, "dc.json: field 'authEnabled': expected true or false"),
        ({"computeType": "mainframe"}, "dc.json: field 'computeType': expected one of"),
        ({"primaryKey": "short"}, "dc.json: field 'primaryKey': expected a key of at least 8"),
        ({"autoScaler": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas is greater"),
        ({"sslEnabled": True}, "dc.json: field 'sslEnabled': TLS is not terminated"),
        ([1, 2], "expected a JSON object at the top level"),
    ],
)  # fmt: skip
def test_invalid_deployment_fields_are_named(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_deployment_config(_write(tmp_path / "dc.json", data))
    assert message in str(info.value)


def test_unknown_inference_field_lists_the_known_ones(tmp_path: Path) -> None:
    ic = _write(tmp_path / "ic.json", {"entry_script": "score.py"})
    with pytest.raises(ConfigError, match=r"ic\.json: unknown field 'entry_script'") as info:
        load_inference_config(ic)
    assert "entryScript" in info.value.hint


def test_broken_json_names_the_line(tmp_path: Path) -> None:
    broken = tmp_path / "dc.json"
    broken.write_text('{\n  "port": 8890,\n  "authEnabled": tru\n}\n')
    with pytest.raises(ConfigError, match=r"dc.json is not valid JSON: .* at line 3"):
        load_deployment_config(broken)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"deployment config file .*nope\.json does not exist"):
        load_deployment_config(tmp_path / "nope.json")
    ic = _write(tmp_path / "ic.json", {"entryScript": "score.py", "sourceDirectory": "."})
    with pytest.raises(ConfigError, match=r"entryScript score\.py not found in"):
        load_inference_config(ic)
    with pytest.raises(ConfigError, match="flags: field 'port': expected an integer"):
        load_deployment_config(None, overrides={"port": 0})
