"""The agent's config: TOML, env overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfleet.agent.config import load_config
from modelfleet.agent.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_toml_then_env_overrides(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    path = write(
        tmp_path,
        f'[device]\nid = "dev-1"\n[broker]\nport = 1884\npassword_file = "{secret}"\n'
        f'[store]\ndir = "{tmp_path}"\ntrusted_keys = []\n[telemetry]\ninterval_s = 5\n',
    )
    cfg = load_config(path, env={"MODELFLEET_AGENT_BROKER_PORT": "1999", "MODELFLEET_AGENT_BROKER_TLS": "yes"})
    assert cfg.device_id == "dev-1" and cfg.username == "dev-1"
    assert cfg.broker_port == 1999 and cfg.broker_tls is True
    assert cfg.password() == "s3cret"
    assert cfg.telemetry_interval_s == 5.0 and cfg.store_dir == tmp_path


def test_tags_from_toml_table_or_env_json(tmp_path: Path) -> None:
    path = write(tmp_path, '[device]\nid = "d"\ntags = {site = "plant-1", ring = 0}\n')
    assert load_config(path, env={}).device_tags == {"site": "plant-1", "ring": 0}
    cfg = load_config(path, env={"MODELFLEET_AGENT_DEVICE_TAGS": '{"site": "b"}'})
    assert cfg.device_tags == {"site": "b"}
    with pytest.raises(ConfigError, match=r"device\.tags \(from MODELFLEET_AGENT_DEVICE_TAGS\): expected a table"):
        load_config(path, env={"MODELFLEET_AGENT_DEVICE_TAGS": "site=b"})


def test_env_alone_is_enough() -> None:
    cfg = load_config(None, env={"MODELFLEET_AGENT_DEVICE_ID": "d2", "MODELFLEET_AGENT_STORE_TRUSTED_KEYS": ""})
    assert cfg.device_id == "d2" and cfg.store_trusted_keys == []


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("", {}, r"config: device\.id: is required"),
        ('[device]\nid = "a/b"\n', {}, r"config: device\.id: device id 'a/b' is invalid"),
        ('[device]\nid = "modelfleet-controller"\n', {}, r"config: device\.id: device id 'modelfleet-controller' is reserved"),
        ('[device]\nid = "d"\n[store]\nallow_file_urls = "yes please"\n', {}, r"store\.allow_file_urls \(from .*\): expected bool"),
        ('[device]\nid = "d"\n[broker]\nhots = "x"\n', {}, r"config: broker\.hots: unknown key"),
        ('[devices]\nid = "d"\n', {}, r"config: devices: unknown section"),
        ('broker = "localhost"\n[device]\nid = "d"\n', {}, r"config: broker: must be a table \(\[broker\] with keys"),
        ('[device]\nid = "d"\n[broker]\nport = "many"\n', {}, r"broker\.port \(from .*agent\.toml\): expected int, got 'many'"),
        ('[device]\nid = "d"\n', {"MODELFLEET_AGENT_BROKER_PORT": "70000"}, r"broker\.port: must be 0-65535"),
        ('[device]\nid = "d"\n', {"MODELFLEET_AGENT_TELEMETRY_INTERVAL_S": "0"}, r"telemetry\.interval_s: must be positive"),
        ('[device]\nid = "d"\n', {"MODELFLEET_AGENT_BROKER_TLS": "maybe"}, r"broker\.tls \(from MODELFLEET_AGENT_BROKER_TLS\): expected bool"),
        ('[device]\nid = "d"\n[store]\ntrusted_keys = ["/nope.pem"]\n', {}, r"store\.trusted_keys: file not found: /nope\.pem"),
        ('[device]\nid = "d"\n[log]\nlevel = "LOUD"\n', {}, r"log\.level: must be DEBUG"),
        ('[device]\nid = "d"\n[commands]\nmax_age_s = -1\n', {}, r"commands\.max_age_s: must be >= 0, got -1"),
        ("[device\n", {}, r"is not valid TOML"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), env=env)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config: cannot read .*missing\.toml"):
        load_config(tmp_path / "missing.toml", env={})
