"""The MQTT fleet backend against a broker that wants a password: a refusal is named as one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.mqtt


def test_wrong_broker_password_is_reported_as_a_refusal(mosquitto: Any, tmp_path: Path) -> None:
    mosquitto.stop()
    passwords = tmp_path / "passwords"
    passwords.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "ctl", "secret"], check=True, capture_output=True)
    broker = type(mosquitto)(
        tmp_path / "secured", extra_config=f"allow_anonymous false\nuser root\npassword_file {passwords}\n"
    )
    broker.workdir.mkdir()
    broker.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "modelfleet.deployer", "fleet", "devices",
             "--broker", f"mqtt://ctl:wrong@127.0.0.1:{broker.port}"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "MODELFLEET_HOME": str(tmp_path / "home")},
        )
    finally:
        broker.stop()
    assert done.returncode == 1, done.stderr
    assert f"the MQTT broker at mqtt://127.0.0.1:{broker.port} refused the connection: " in done.stderr
    assert "not authorised" in done.stderr.lower() or "bad user name or password" in done.stderr.lower()
    assert "hint: check the user and password" in done.stderr
    assert "wrong" not in done.stderr  # the password never shows
