"""Settings: file -> env -> flags precedence, Azure ML aliases, errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfleet.scoring import ConfigError, load_settings
from modelfleet.scoring.cli import main


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('[serve]\nport = 7000\nmax-body-bytes = 100\nmodel_name = "from-file"\n')
    env = {"MODELFLEET_PORT": "7001", "MODELFLEET_MODEL_NAME": "from-env"}
    s = load_settings({"port": "7002"}, config_file=config, environ=env)
    assert (s.port, s.model_name, s.max_body_bytes) == (7002, "from-env", 100)


def test_azureml_aliases_are_honoured_and_modelfleet_names_win(tmp_path: Path) -> None:
    s = load_settings({}, environ={"AZUREML_MODEL_DIR": str(tmp_path), "AZUREML_ENTRY_SCRIPT": "score.py"})
    assert s.model_dir == tmp_path and s.entry_script == "score.py"
    other = tmp_path / "other"
    other.mkdir()
    s = load_settings({}, environ={"AZUREML_MODEL_DIR": str(tmp_path), "MODELFLEET_MODEL_DIR": str(other)})
    assert s.model_dir == other


@pytest.mark.parametrize(
    ("flags", "env", "field", "message"),
    [
        ({"port": "abc"}, {}, "port", "--port must be an integer, got 'abc'"),
        ({"port": "70000"}, {}, "port", "must be 0-65535, got 70000"),
        ({}, {"MODELFLEET_MAX_BODY_BYTES": "lots"}, "max_body_bytes", "env MODELFLEET_MAX_BODY_BYTES must be an integer"),
        ({"workers": "0"}, {}, "workers", "must be at least 1"),
        ({"scoring_timeout_ms": "0"}, {}, "scoring_timeout_ms", "must be positive"),
        ({"model_dir": "/no/such/dir"}, {}, "model_dir", "does not exist: /no/such/dir"),
        ({"keys_file": "/no/keys.json"}, {}, "keys_file", "file not found: /no/keys.json"),
        ({"log_level": "LOUD"}, {}, "log_level", "must be DEBUG, INFO, WARNING or ERROR"),
        ({"max_concurrent_requests": "-1"}, {}, "max_concurrent_requests", "must be >= 0, got -1"),
        ({}, {"MODELFLEET_MAX_QUEUED_REQUESTS": "-2"}, "max_queued_requests", "must be >= 0, got -2"),
        ({"inline_threshold_ms": "fast"}, {}, "inline_threshold_ms", "--inline-threshold-ms must be a number, got 'fast'"),
        ({"inline_threshold_ms": "-1"}, {}, "inline_threshold_ms", "must be >= 0, got -1.0"),
        ({"keep_alive_s": "0"}, {}, "keep_alive_s", "must be positive, got 0.0"),
        ({"load_timeout_s": "0"}, {}, "load_timeout_s", "must be positive, got 0.0"),
        ({}, {"MODELFLEET_LOAD_TIMEOUT_S": "soon"}, "load_timeout_s", "env MODELFLEET_LOAD_TIMEOUT_S must be a number, got 'soon'"),
    ],
)
def test_bad_values_name_the_field(flags: dict[str, str], env: dict[str, str], field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(flags, environ=env)
    assert info.value.field == field
    assert message in str(info.value)


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings({}, config_file=bad, environ={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError) as info:
        load_settings({}, config_file=unknown, environ={})
    assert info.value.field == "colour"
    assert str(info.value) == f"colour: unknown setting in {unknown}"
    with pytest.raises(ConfigError, match="file not found"):
        load_settings({}, config_file=tmp_path / "missing.toml", environ={})
    boolean = tmp_path / "bool.toml"
    boolean.write_text("[serve]\nworkers = true\n")
    with pytest.raises(ConfigError) as info:
        load_settings({}, config_file=boolean, environ={})
    assert str(info.value) == f"workers: workers in {boolean} must be an integer, got True"


def test_cli_reports_config_errors_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("MODELFLEET_MODEL_DIR", "AZUREML_MODEL_DIR", "MODELFLEET_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert main(["serve", "--model-dir", str(tmp_path), "--port", "nope"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: port (--port / MODELFLEET_PORT): --port must be an integer, got 'nope'"
    )
    assert main(["serve"]) == 2
    assert "model_dir (--model-dir / MODELFLEET_MODEL_DIR): required" in capsys.readouterr().err


def test_cli_reports_a_bad_keys_file_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"secondary": "only"}')
    code = main(["serve", "--model-dir", str(tmp_path), "--port", "0", "--keys-file", str(keys)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f'error: keys_file (--keys-file / MODELFLEET_KEYS_FILE): {keys} needs a non-empty "primary" key '
        '(and optionally "secondary")'
    )


def test_load_timeout_default_env_and_flag() -> None:
    assert load_settings({}, environ={}).load_timeout_s == 300.0
    env = {"MODELFLEET_LOAD_TIMEOUT_S": "2.5"}
    assert load_settings({}, environ=env).load_timeout_s == 2.5
    assert load_settings({"load_timeout_s": "7"}, environ=env).load_timeout_s == 7.0
