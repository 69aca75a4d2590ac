"""`modelfleet fleet` bad input: every mistake a user can make gets one clear line and a hint."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelfleet.deployer.cli import app


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("MODELFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODELFLEET_MQTT_URL", f"mqtt://127.0.0.1:{dead}")
    runner = CliRunner()

    def invoke(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, ["fleet", *args])
        return result.exit_code, result.output

    return invoke


def test_malformed_where_names_the_position(run) -> None:  # type: ignore[no-untyped-def]
    code, out = run("devices", "--where", "tags.site = 'a' AND")
    assert code != 0
    assert "invalid target condition at position 20: expected a field" in out
    assert "hint:" in out


def test_unreachable_broker_is_one_clear_line(run) -> None:  # type: ignore[no-untyped-def]
    code, out = run("devices")
    assert code != 0
    assert "error: cannot reach the MQTT broker at mqtt://127.0.0.1:" in out
    assert "Connection refused" in out
    assert "Traceback" not in out


def test_bad_broker_url(run) -> None:  # type: ignore[no-untyped-def]
    code, out = run("devices", "--broker", "http://x")
    assert code != 0
    assert "broker URL 'http://x' is not mqtt://host[:port]" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stages", "10,5,100"], "--stages: 5 does not increase on 10"),
        (["--stages", "10,50"], "--stages: the last stage must be 100"),
        (["--max-failure", "lots"], "--max-failure: 'lots' is not a percentage"),
        (["--max-failure", "5"], "hint: write e.g. 5% or 0.05 (a bare number is a fraction)"),
        (["--soak", "2 weeks"], "--soak: '2 weeks' is not a duration"),
        (["--timeout", "-1"], "--timeout: '-1' is not a duration"),
        (["--min-soak-requests", "-1"], "--min-soak-requests: -1 is not a request count"),
        (["--target", "tags.hw IN ['a'"], "invalid target condition at position 16: expected ',' or ']'"),
        (["--model", "digits:x"], "invalid version 'x' in 'digits:x'"),
        (["--model", "nothing:1"], "model 'nothing' is not registered"),
    ],
)
def test_bad_rollout_options_are_refused_before_anything_changes(run, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    base = {"--model": "digits:1", "--target": "*"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    flat = [x for kv in base.items() for x in kv]
    code, out = run("rollout", "create", "r1", *flat)
    assert code != 0
    assert message in out
    code, out = run("rollout", "list")
    assert code == 0 and "(none)" in out


def test_unknown_rollout(run) -> None:  # type: ignore[no-untyped-def]
    for command in ("status", "pause", "resume", "abort", "rollback"):
        code, out = run("rollout", command, "ghost")
        assert code != 0, command
        assert "no rollout named 'ghost'" in out
        assert "modelfleet fleet rollout list" in out


def test_resume_while_a_controller_drives_names_it(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import os

    from modelfleet.agent.modelref import ModelVersionRef
    from modelfleet.deployer.fleet.backends.memory import MemoryFleetBackend
    from modelfleet.deployer.fleet.rollout import RolloutEngine, RolloutSpec
    from modelfleet.deployer.fleet.store import FleetStore

    backend = MemoryFleetBackend()
    backend.add("dev-1")
    v2 = ModelVersionRef(name="digits", version=2, url="http://127.0.0.1:1/a", sha256="2" * 64, size=10)
    engine = RolloutEngine(FleetStore(tmp_path / "home"), backend)
    engine.create(RolloutSpec("r", v2))
    with engine.lease("r"):
        code, out = run("rollout", "resume", "r")
    assert code != 0
    assert f"rollout 'r' is already driven by another process (pid {os.getpid()})" in out


def test_tag_needs_key_value(run) -> None:  # type: ignore[no-untyped-def]
    code, out = run("tag", "dev-1", "site")
    assert code != 0
    assert "tag 'site' is not KEY=VALUE" in out


@pytest.mark.parametrize("key", ["a.b", "my key", "x/y"])
def test_tag_key_a_target_condition_cannot_name_is_refused(run, key: str) -> None:  # type: ignore[no-untyped-def]
    code, out = run("tag", "dev-1", f"{key}=x")
    assert code != 0
    assert f"tag key {key!r} could not be used in a target condition" in out
    assert "no dots or spaces" in out  # the hint


def test_status_table_shows_why_a_rollout_stopped(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from modelfleet.agent.modelref import ModelVersionRef
    from modelfleet.deployer.fleet.backends.memory import MemoryFleetBackend
    from modelfleet.deployer.fleet.rollout import RolloutEngine, RolloutSpec
    from modelfleet.deployer.fleet.store import FleetStore

    backend = MemoryFleetBackend()
    for i in range(4):
        backend.add(f"dev-{i}")
    v2 = ModelVersionRef(name="digits", version=2, url="http://127.0.0.1:1/a", sha256="2" * 64, size=10)
    engine = RolloutEngine(FleetStore(tmp_path / "home"), backend)
    engine.create(RolloutSpec("r", v2, stages=(25, 100)))
    engine.step("r")
    canary = engine.store.devices("r", states=("pending",))[0].device_id
    backend.report(canary, "failed", reason="ValueError: broken", stage="warmup")
    assert engine.step("r").state == "failed"

    code, out = run("rollout", "status", "r")
    assert code == 0
    assert "failed" in out
    assert f"stage 1: 1 of 1 devices failed (max 0%); {canary}: warmup: ValueError: broken" in out
    assert "rolled_back=1" in out and "waiting=3" in out  # progress per stage
    row = next(line for line in out.splitlines() if line.startswith(canary))
    assert "rolled_back" in row and "warmup: ValueError: broken" in row
    code, out = run("rollout", "list")
    assert code == 0 and "digits:2" in out and "failed" in out


def test_detached_controller_gets_the_broker_password_outside_its_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from modelfleet.deployer.fleet import operations

    monkeypatch.setenv("MODELFLEET_HOME", str(tmp_path / "home"))
    started: list[tuple[list[str], dict[str, str]]] = []

    class Recorder:
        pid = 4242

        def __init__(self, args: list[str], **kwargs: object) -> None:
            started.append((args, kwargs["env"]))  # type: ignore[arg-type]

    monkeypatch.setattr(subprocess, "Popen", Recorder)
    assert operations.start_detached("r", "mqtt://ctl:s3cret@127.0.0.1:1883") == 4242
    [(args, env)] = started
    assert not any("s3cret" in a for a in args)
    assert env["MODELFLEET_MQTT_URL"] == "mqtt://ctl:s3cret@127.0.0.1:1883"


@pytest.mark.parametrize("script", ["/etc/evil.py", "../outside.py"])
def test_entry_script_outside_the_model_folder_is_one_clear_error(tmp_path: Path, script: str) -> None:
    from modelfleet.deployer.fleet.operations import resolve_model
    from modelfleet.deployer.fleet.store import FleetError
    from modelfleet.deployer.registry import Registry

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "score.py").write_text("def init():\n    pass\n\ndef run(data):\n    return data\n")
    home = tmp_path / "home"
    Registry(home).register("scripted", folder)
    with pytest.raises(FleetError) as err:
        resolve_model("scripted:1", "http://127.0.0.1:9", home, entry_script=script)
    assert f"--entry-script {script!r}" in str(err.value)
    assert "relative to the registered model folder" in (err.value.hint or "")


def test_status_says_when_timed_out_devices_could_not_be_checked(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from modelfleet.agent.modelref import ModelVersionRef
    from modelfleet.deployer.fleet.backends.memory import MemoryFleetBackend
    from modelfleet.deployer.fleet.rollout import RolloutEngine, RolloutSpec
    from modelfleet.deployer.fleet.store import FleetStore

    backend = MemoryFleetBackend()
    backend.add("dev-0")
    v2 = ModelVersionRef(name="digits", version=2, url="http://127.0.0.1:1/a", sha256="2" * 64, size=10)
    now = [1000.0]
    engine = RolloutEngine(FleetStore(tmp_path / "home"), backend, clock=lambda: now[0])
    engine.create(RolloutSpec("r", v2, max_failure=1.0, timeout_s=5))
    engine.step("r")
    now[0] += 6
    assert engine.step("r").state == "succeeded"

    code, out = run("rollout", "status", "r")
    assert code == 0
    assert "warning: 1 timed-out or rolled-back device(s) not checked on the broker: cannot reach the MQTT broker" in out
    row = next(line for line in out.splitlines() if line.startswith("dev-0"))
    assert "timeout" in row


def test_status_warns_when_a_soak_saw_no_traffic(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from modelfleet.agent.modelref import ModelVersionRef
    from modelfleet.deployer.fleet.backends.memory import MemoryFleetBackend
    from modelfleet.deployer.fleet.rollout import RolloutEngine, RolloutSpec
    from modelfleet.deployer.fleet.store import FleetStore

    backend = MemoryFleetBackend()
    backend.add("dev-0")
    v2 = ModelVersionRef(name="digits", version=2, url="http://127.0.0.1:1/a", sha256="2" * 64, size=10)
    now = [1000.0]
    engine = RolloutEngine(FleetStore(tmp_path / "home"), backend, clock=lambda: now[0])
    engine.create(RolloutSpec("r", v2, soak_s=30))
    engine.step("r")
    backend.report("dev-0", "applied")
    engine.step("r")
    now[0] += 31
    assert engine.step("r").state == "succeeded"

    code, out = run("rollout", "status", "r")
    assert code == 0
    assert "warning: stage 1: soak saw no traffic" in out


def test_status_table_names_a_rollback_to_no_model(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from modelfleet.agent.modelref import ModelVersionRef
    from modelfleet.deployer.fleet.backends.memory import MemoryFleetBackend
    from modelfleet.deployer.fleet.rollout import RolloutEngine, RolloutSpec
    from modelfleet.deployer.fleet.store import FleetStore

    backend = MemoryFleetBackend()
    backend.add("fresh-0")
    v2 = ModelVersionRef(name="digits", version=2, url="http://127.0.0.1:1/a", sha256="2" * 64, size=10)
    engine = RolloutEngine(FleetStore(tmp_path / "home"), backend)
    engine.create(RolloutSpec("r", v2))
    engine.step("r")
    backend.report("fresh-0", "failed", reason="ValueError: broken", stage="warmup")
    assert engine.step("r").state == "failed"

    code, out = run("rollout", "status", "r")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("fresh-0"))
    assert "rolled_back" in row and "(no model)" in row
    assert "rolled back to no model (it had none before)" in out


def _stored(url: str) -> object:
    from modelfleet.agent.modelref import ModelVersionRef
    from modelfleet.deployer.fleet.operations import backend_record
    from modelfleet.deployer.fleet.store import Rollout

    v2 = ModelVersionRef(name="digits", version=2, url="http://127.0.0.1:1/a", sha256="2" * 64, size=10)
    return Rollout("r", v2, "*", [100], 0.0, 0.0, 60.0, 0.05, None, backend_record(url))


def test_a_rollout_stores_the_broker_url_and_user_never_the_password(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from modelfleet.deployer.fleet.operations import backend_record, broker_url

    assert backend_record("mqtt://ctl:s3cret@10.0.0.5:1884") == {"kind": "mqtt", "url": "mqtt://10.0.0.5:1884", "username": "ctl"}
    monkeypatch.delenv("MODELFLEET_MQTT_URL", raising=False)
    monkeypatch.delenv("MODELFLEET_BROKER_PASSWORD", raising=False)
    r = _stored("mqtt://ctl:s3cret@10.0.0.5:1884")
    assert broker_url(None, r) == "mqtt://ctl@10.0.0.5:1884"  # no password known: the broker will say so
    monkeypatch.setenv("MODELFLEET_BROKER_PASSWORD", "p@ss:word")
    assert broker_url(None, r) == "mqtt://ctl:p%40ss%3Aword@10.0.0.5:1884"
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    assert broker_url(None, r, secret) == "mqtt://ctl:from-file@10.0.0.5:1884"  # the file wins
    secret.write_text("  from-file  \nnot part of it\n")
    assert broker_url(None, r, secret) == "mqtt://ctl:from-file@10.0.0.5:1884"  # its first line, trimmed
    # --broker (or $MODELFLEET_MQTT_URL) overrides the stored connection; a password in it wins over the env
    assert broker_url("mqtt://other:inline@127.0.0.1:1883", r) == "mqtt://other:inline@127.0.0.1:1883"
    monkeypatch.setenv("MODELFLEET_MQTT_URL", "mqtts://ops@broker.example:8883")
    assert broker_url(None, r) == "mqtts://ops:p%40ss%3Aword@broker.example:8883"
    from modelfleet.deployer.fleet.backends.mqtt import MqttFleetSettings

    settings = MqttFleetSettings.from_url(broker_url(None, r))
    assert (settings.username, settings.password, settings.tls) == ("ops", "p@ss:word", True)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read it: No such file or directory"),
        ("\n", "is empty"),
        ("\ns3cret\n", "is empty (on its first line)"),
    ],
)
def test_bad_broker_password_file_is_one_clear_error(run, tmp_path: Path, content: str | None, message: str) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "secret"
    if content is not None:
        secret.write_text(content)
    code, out = run("devices", "--broker", "mqtt://ctl@127.0.0.1:1", "--broker-password-file", str(secret))
    assert code != 0
    assert f"error: --broker-password-file {secret}" in out and message in out
    assert "Traceback" not in out


def test_a_password_file_without_a_user_is_refused(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    code, out = run("devices", "--broker", "mqtt://127.0.0.1:1", "--broker-password-file", str(secret))
    assert code != 0
    assert "the broker URL mqtt://127.0.0.1:1 names no user" in out
    assert "hint: give the user in the URL, e.g. --broker mqtt://USER@host:1883" in out
    assert "s3cret" not in out


def test_status_of_a_paused_rollout_shows_the_watched_time_of_its_stage(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from modelfleet.agent.modelref import ModelVersionRef
    from modelfleet.deployer.fleet.backends.memory import MemoryFleetBackend
    from modelfleet.deployer.fleet.rollout import RolloutEngine, RolloutSpec
    from modelfleet.deployer.fleet.store import FleetStore

    backend = MemoryFleetBackend()
    backend.add("dev-0")
    v2 = ModelVersionRef(name="digits", version=2, url="http://127.0.0.1:1/a", sha256="2" * 64, size=10)
    now = [1000.0]
    engine = RolloutEngine(FleetStore(tmp_path / "home"), backend, clock=lambda: now[0])
    engine.create(RolloutSpec("r", v2, timeout_s=600))
    engine.step("r")
    now[0] += 42
    engine.step("r")
    engine.pause("r")
    now[0] += 900

    code, out = run("rollout", "status", "r")
    assert code == 0
    assert "1 of 1 (deploying, 42s of the 600s timeout)" in out


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://ops@broker.example", "broker URL 'http://broker.example' is not mqtt://host[:port]"),
        ("mqtt://ops@broker.example:port", "broker URL 'mqtt://broker.example:port' has an invalid port"),
        # typed with the password in it, but malformed: no URL parser finds the password to hide
        ("ops:s3cret@broker.example:1883", "broker URL 'broker.example:1883' is not mqtt://host[:port]"),
        ("mqtt//ops:s3cret@broker.example", "broker URL 'broker.example' is not mqtt://host[:port]"),
    ],
)
def test_a_bad_broker_url_never_shows_the_password(
    run, monkeypatch: pytest.MonkeyPatch, url: str, message: str  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("MODELFLEET_BROKER_PASSWORD", "s3cret")
    code, out = run("devices", "--broker", url)
    assert code != 0
    assert message in out
    assert "s3cret" not in out


def test_list_counts_late_devices_as_applied_and_status_shows_them(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    from modelfleet.agent.modelref import ModelVersionRef
    from modelfleet.deployer.fleet.backends.memory import MemoryFleetBackend
    from modelfleet.deployer.fleet.rollout import RolloutEngine, RolloutSpec
    from modelfleet.deployer.fleet.store import FleetStore

    backend = MemoryFleetBackend()
    backend.add("dev-0")
    backend.add("dev-1")
    v2 = ModelVersionRef(name="digits", version=2, url="http://127.0.0.1:1/a", sha256="2" * 64, size=10)
    now = [1000.0]
    engine = RolloutEngine(FleetStore(tmp_path / "home"), backend, clock=lambda: now[0])
    engine.create(RolloutSpec("r", v2, max_failure=0.5, timeout_s=5))
    engine.step("r")
    backend.report("dev-0", "applied")
    now[0] += 6
    assert engine.step("r").state == "succeeded"
    backend.report("dev-1", "applied")  # after its stage timed out
    assert engine.converged_late("r") == ["dev-1"]

    code, out = run("rollout", "list", "--output", "json")
    assert code == 0
    [row] = json.loads(out)
    assert (row["devices"], row["applied"]) == (2, 2)
    code, out = run("rollout", "status", "r")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("dev-1"))
    assert "late" in line and "applied after its stage timed out (did not apply within 5s)" in line


def test_status_does_not_look_up_a_rollback_that_has_no_version_to_confirm(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    from modelfleet.agent.modelref import ModelVersionRef
    from modelfleet.deployer.fleet.backends.memory import MemoryFleetBackend
    from modelfleet.deployer.fleet.rollout import RolloutEngine, RolloutSpec
    from modelfleet.deployer.fleet.store import FleetStore

    backend = MemoryFleetBackend()
    backend.add("dev-0")
    v2 = ModelVersionRef(name="digits", version=2, url="http://127.0.0.1:1/a", sha256="2" * 64, size=10)
    engine = RolloutEngine(FleetStore(tmp_path / "home"), backend)
    engine.create(RolloutSpec("r", v2))
    engine.step("r")
    backend.report("dev-0", "failed", reason="boom", stage="warmup")
    assert engine.step("r").state == "failed"
    # as a row rolled back before the database gained confirmations looks after the upgrade
    with sqlite3.connect(tmp_path / "home" / "registry.db") as db:
        db.execute("UPDATE fleet_rollout_devices SET desired_version = NULL")

    code, out = run("rollout", "status", "r")  # the broker in the environment is down
    assert code == 0
    assert "warning" not in out
    assert "rolled_back" in next(line for line in out.splitlines() if line.startswith("dev-0"))
