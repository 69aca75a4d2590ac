"""`modelfleet-agent run`: user errors are one line naming the field, exit status 2."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from modelfleet.agent.cli import main


def run(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    config = tmp_path / "agent.toml"
    config.write_text(text)
    code = main(["run", "--config", str(config)])
    return code, capsys.readouterr().err


def test_missing_device_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(tmp_path, "[broker]\nport = 1883\n", capsys)
    assert code == 2
    assert err.strip() == "modelfleet-agent: error: config: device.id: is required (the device id, also its MQTT user name)"


def test_unwritable_store_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run(tmp_path, f'[device]\nid = "d"\n[store]\ndir = "{blocker}/sub"\n', capsys)
    assert code == 2 and "config: store.dir: " in err and "is not a writable folder" in err


def test_scoring_port_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run(
            tmp_path,
            f'[device]\nid = "d"\n[store]\ndir = "{tmp_path / "s"}"\n[scoring]\nport = {port}\n'
            '[broker]\nport = 1\n',
            capsys,
        )
    assert code == 2 and f"config: scoring.port: cannot listen on 127.0.0.1:{port}" in err


def test_usage_without_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2 and "run" in capsys.readouterr().err
