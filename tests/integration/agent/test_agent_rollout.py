"""The agent end to end: real mosquitto, the real artifact server, real ONNX models, agent subprocesses."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_harness import Controller, RegistryHandle, wait_until  # type: ignore[import-not-found]
from helpers_traffic import Traffic

from modelfleet.agent.protocol import CommandRequest
from modelfleet.deployer.samples import digits_rows

pytestmark = pytest.mark.mqtt
ROWS = digits_rows(2)


def score(port: int) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/score", json={"data": ROWS}, timeout=10)


def serving_version(port: int) -> str:
    r = score(port)
    assert r.status_code == 200, r.text
    return str(r.headers["x-model-version"])


def test_v1_applied_then_v2_hot_swapped_under_traffic_with_no_failed_request(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path, digits_onnx_v2: Path,
) -> None:
    v1 = artifact_registry.register("digits", digits_onnx)
    v2 = artifact_registry.register("digits", digits_onnx_v2)
    agent = agents("dev-1", mosquitto.port)
    wait_until(lambda: controller.presence.get("dev-1"), 30, "birth message")
    assert controller.presence["dev-1"][-1].online

    d1 = controller.desire("dev-1", v1)
    report = controller.wait_reported("dev-1", d1, "applied")
    assert report.active is not None and (report.active.name, report.active.version) == ("digits", 1)
    port = agent.scoring_port
    assert serving_version(port) == "1"

    with Traffic(f"http://127.0.0.1:{port}/score", {"data": ROWS}, clients=2) as traffic:
        wait_until(lambda: "1" in traffic.versions, 10, "traffic on v1")
        d2 = controller.desire("dev-1", v2)
        report = controller.wait_reported("dev-1", d2, "applied")
        wait_until(lambda: "2" in traffic.versions, 10, "traffic on v2")
    assert traffic.failures == []
    assert report.active is not None and report.active.version == 2
    assert report.previous is not None and report.previous.version == 1
    assert report.applied_version == d2

    # the swap shows up in telemetry
    def swap_seen() -> bool:
        return any(
            s.get("to") == "digits:2" and s.get("ok")
            for rec in controller.telemetry_records("dev-1") for s in rec["swaps"]
        )

    wait_until(swap_seen, 15, "swap event in telemetry")
    assert agent.terminate() == 0
    assert "event=agent_stopped" in agent.log_text()
    last = controller.presence["dev-1"][-1]
    assert last.online is False and last.clean is True


def test_corrupt_artifact_is_rejected_and_v1_keeps_serving(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path, digits_onnx_v2: Path,
) -> None:
    v1 = artifact_registry.register("digits", digits_onnx)
    v2 = artifact_registry.register("digits", digits_onnx_v2)
    agent = agents("dev-2", mosquitto.port)
    controller.wait_reported("dev-2", controller.desire("dev-2", v1), "applied")
    port = agent.scoring_port

    # the ref promises other bytes than the server holds: the download must not verify
    lying = dataclasses.replace(v2, sha256="0" * 64)
    d2 = controller.desire("dev-2", lying)
    report = controller.wait_reported("dev-2", d2, "failed")
    assert report.stage == "verify"
    assert report.reason is not None and "sha256 mismatch" in report.reason
    assert report.active is not None and report.active.version == 1
    assert serving_version(port) == "1"
    # nothing of the bad version stays on disk
    assert not (agent.store_dir / "models" / "versions" / ("0" * 64)).exists()
    assert not list((agent.store_dir / "models" / "partial").glob("*.part"))

    # final, not retried: no flapping between applying and failed
    reports_now = len(controller.reported["dev-2"])
    d3 = controller.desire("dev-2", v2)
    controller.wait_reported("dev-2", d3, "applied")
    between = [r for r in controller.reported["dev-2"][reports_now:] if r.version == d2]
    assert between == []
    assert serving_version(port) == "2"


def test_model_failing_warmup_is_rejected_and_v1_keeps_serving(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path, tmp_path: Path,
) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "score.py").write_text(
        "from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType\n"
        "from inference_schema.schema_decorators import input_schema\n\n"
        "def init():\n    pass\n\n"
        "@input_schema('data', StandardPythonParameterType([1, 2, 3]))\n"
        "def run(data):\n    raise ValueError('this model is broken')\n"
    )
    v1 = artifact_registry.register("digits", digits_onnx)
    bad = dataclasses.replace(artifact_registry.register("digits", broken), entry_script="score.py")
    assert bad.format == "tar"
    agent = agents("dev-3", mosquitto.port)
    controller.wait_reported("dev-3", controller.desire("dev-3", v1), "applied")
    port = agent.scoring_port

    d2 = controller.desire("dev-3", bad)
    report = controller.wait_reported("dev-3", d2, "failed")
    assert report.stage == "warmup"
    assert report.reason is not None and "this model is broken" in report.reason
    assert report.active is not None and report.active.version == 1
    assert serving_version(port) == "1"


def test_bad_desired_state_is_reported_and_changes_nothing(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path,
) -> None:
    v1 = artifact_registry.register("digits", digits_onnx)
    agent = agents("dev-4", mosquitto.port)
    controller.wait_reported("dev-4", controller.desire("dev-4", v1), "applied")
    controller.publish_raw("modelfleet/v1/dev-4/desired", b'{"$version": 9, "model": {"name": "x"}}', retain=True)
    report = controller.wait_reported("dev-4", 9, "failed")
    assert report.stage == "desired" and "missing field 'version'" in (report.reason or "")
    assert serving_version(agent.scoring_port) == "1"

    # a malformed command is answered under its id, when that much can be read, else under ""
    commands = "modelfleet/v1/dev-4/commands"
    controller.publish_raw(commands, b'{"protocol": 1, "id": "c-bad", "name": "get-state", "args": []}')
    answer = wait_until(lambda: controller.responses.get("c-bad"), 30, "response to a malformed command")
    assert not answer.ok and "command: 'args' must be an object" in (answer.error or "")
    controller.publish_raw(commands, b"not json")
    garbled = wait_until(lambda: controller.responses.get(""), 30, "response to a garbled command")
    assert not garbled.ok and "command: not valid JSON" in (garbled.error or "")

    # a command that fails on something unforeseen is answered too, not left to the controller's timeout
    shutil.rmtree(agent.store_dir / "models" / "versions")
    broken = controller.command("dev-4", "get-state")
    assert not broken.ok and "get-state failed: FileNotFoundError" in (broken.error or "")
    assert serving_version(agent.scoring_port) == "1"  # what is loaded keeps serving


def test_commands_get_state_rollback_restart_and_unknown(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path, digits_onnx_v2: Path,
) -> None:
    v1 = artifact_registry.register("digits", digits_onnx)
    v2 = artifact_registry.register("digits", digits_onnx_v2)
    agent = agents("dev-5", mosquitto.port)
    wait_until(lambda: controller.presence.get("dev-5"), 30, "birth message")

    fresh = controller.command("dev-5", "get-state")
    assert fresh.ok and fresh.result is not None
    assert (fresh.result["status"], fresh.result["$version"], fresh.result["active"]) == ("applied", None, None)

    nothing = controller.command("dev-5", "rollback")
    assert not nothing.ok and "no previous version" in (nothing.error or "")

    controller.wait_reported("dev-5", controller.desire("dev-5", v1), "applied")
    d2 = controller.desire("dev-5", v2)
    controller.wait_reported("dev-5", d2, "applied")
    port = agent.scoring_port

    state = controller.command("dev-5", "get-state")
    assert state.ok and state.result is not None
    assert state.result["active"]["version"] == 2 and state.result["$version"] == d2
    assert sorted(state.result["store"]) == sorted([v1.sha256, v2.sha256])

    back = controller.command("dev-5", "rollback")
    assert back.ok and back.result is not None
    assert back.result["active"]["version"] == 1 and back.result["stage"] == "rollback"
    assert serving_version(port) == "1"
    report = controller.wait_reported("dev-5", d2, "failed")
    assert "rolled back from digits:2 to digits:1" in (report.reason or "")

    restarted = controller.command("dev-5", "restart-model")
    assert restarted.ok
    assert serving_version(port) == "1"

    unknown = controller.command("dev-5", "reboot")
    assert not unknown.ok and "unknown command 'reboot'" in (unknown.error or "")

    # a restart keeps the rollback: the agent does not re-apply the rolled-back $version
    assert agent.terminate() == 0
    agent.start()
    port = agent.scoring_port
    controller.wait_reported("dev-5", d2, "failed")
    assert serving_version(port) == "1"


def test_disk_reserve_refusal_is_reported_and_v1_keeps_serving(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path, digits_onnx_v2: Path,
) -> None:
    v1 = artifact_registry.register("digits", digits_onnx)
    v2 = artifact_registry.register("digits", digits_onnx_v2)
    agent = agents("dev-disk", mosquitto.port)
    controller.wait_reported("dev-disk", controller.desire("dev-disk", v1), "applied")
    # the same device, restarted with a reserve larger than any disk
    agent.terminate()
    agent.reconfigure(store_reserve_mb=1 << 40)
    agent.start()
    d2 = controller.desire("dev-disk", v2)
    report = controller.wait_reported("dev-disk", d2, "failed")
    assert report.stage == "download"
    assert "not enough disk space for digits:2" in (report.reason or "")
    assert serving_version(agent.scoring_port) == "1"


def test_desired_no_model_unloads_then_the_model_comes_back(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path,
) -> None:
    v1 = artifact_registry.register("digits", digits_onnx)
    agent = agents("dev-none", mosquitto.port)
    controller.wait_reported("dev-none", controller.desire("dev-none", v1), "applied")
    port = agent.scoring_port
    assert serving_version(port) == "1"

    off = controller.desire("dev-none", None)
    report = controller.wait_reported("dev-none", off, "applied")
    assert report.active is None and report.applied_version == off
    assert report.previous is not None and (report.previous.name, report.previous.version) == ("digits", 1)
    r = score(port)
    assert r.status_code == 503 and "no model loaded" in r.json()["error"]
    assert httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status_code == 503

    def unload_record() -> dict[str, Any] | None:
        # the record that carries the unload's swap event was collected after the unload
        return next((rec for rec in controller.telemetry_records("dev-none")
                     if any(s["to"] is None for s in rec["swaps"])), None)

    record = wait_until(unload_record, 15, "the unload in telemetry")
    assert [(s["from"], s["ok"]) for s in record["swaps"] if s["to"] is None] == [("digits:1", True)]
    assert record["model"] is None  # not the unloaded version's name

    on = controller.desire("dev-none", v1)
    report = controller.wait_reported("dev-none", on, "applied")
    assert report.active is not None and report.active.version == 1
    assert serving_version(port) == "1"
    assert agent.terminate() == 0


def test_commands_sent_while_the_device_is_offline_are_answered_when_it_returns(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path, digits_onnx_v2: Path,
) -> None:
    v1 = artifact_registry.register("digits", digits_onnx)
    v2 = artifact_registry.register("digits", digits_onnx_v2)
    agent = agents("dev-away", mosquitto.port, commands_max_age_s=600)
    controller.wait_reported("dev-away", controller.desire("dev-away", v1), "applied")
    d2 = controller.desire("dev-away", v2)
    controller.wait_reported("dev-away", d2, "applied")
    assert agent.terminate() == 0

    # published while nobody is subscribed: only the device's persistent session holds them
    topic = "modelfleet/v1/dev-away/commands"
    fresh = CommandRequest("c-fresh", "get-state")
    stale = CommandRequest("c-stale", "rollback", issued_at=time.time() - 3600)
    controller.publish_raw(topic, stale.encode())
    controller.publish_raw(topic, fresh.encode())
    agent.start()

    answer = wait_until(lambda: controller.responses.get("c-fresh"), 30, "the response to get-state")
    assert answer.ok and answer.result is not None
    assert (answer.result["$version"], answer.result["active"]["version"]) == (d2, 2)
    expired = wait_until(lambda: controller.responses.get("c-stale"), 30, "the response to the stale rollback")
    assert not expired.ok and (expired.error or "").startswith("expired: rollback was issued 36")
    assert "commands.max_age_s of 600 s" in (expired.error or "")
    assert "event=command name=rollback id=c-stale ok=False" in agent.log_text()
    assert serving_version(agent.scoring_port) == "2"  # the rollback (to v1) was not carried out


def test_a_command_delivered_twice_is_carried_out_once(
    mosquitto: Any, controller: Controller, artifact_registry: RegistryHandle, agents: Any,
    digits_onnx: Path, digits_onnx_v2: Path,
) -> None:
    """QoS 1 is at least once: a persistent session re-sends a command whose PUBACK was lost.
    A second rollback would swap back to the version the first one left."""
    v1 = artifact_registry.register("digits", digits_onnx)
    v2 = artifact_registry.register("digits", digits_onnx_v2)
    agent = agents("dev-dup", mosquitto.port)
    controller.wait_reported("dev-dup", controller.desire("dev-dup", v1), "applied")
    controller.wait_reported("dev-dup", controller.desire("dev-dup", v2), "applied")

    topic = "modelfleet/v1/dev-dup/commands"
    payload = CommandRequest("c-twice", "rollback").encode()
    controller.publish_raw(topic, payload)
    controller.publish_raw(topic, payload)
    first = wait_until(lambda: controller.responses.get("c-twice"), 30, "the response to the rollback")
    assert first.ok and first.result is not None and first.result["active"]["version"] == 1
    wait_until(lambda: "event=command_duplicate name=rollback id=c-twice" in agent.log_text(), 30,
               "the second delivery recognised")
    assert agent.log_text().count("event=command name=rollback id=c-twice ") == 1
    assert serving_version(agent.scoring_port) == "1"

    # a delivery after the answer gets the same answer again, without a second swap
    answers = controller.answers["c-twice"]
    controller.publish_raw(topic, payload)
    wait_until(lambda: controller.answers["c-twice"] > answers, 30, "the repeated answer")
    assert controller.responses["c-twice"] == first
    assert agent.log_text().count("event=command name=rollback id=c-twice ") == 1
    assert serving_version(agent.scoring_port) == "1"
