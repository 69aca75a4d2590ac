"""Fleet rollouts end to end: real mosquitto, real agent processes, real ONNX models, the CLI."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from fleet_harness import Fleet, wait_until  # type: ignore[import-not-found]

from modelfleet.deployer.fleet.rollout import rollout_order
from modelfleet.deployer.fleet.store import FleetStore
from modelfleet.deployer.samples import digits_rows

pytestmark = pytest.mark.mqtt
ROWS = digits_rows(2)

SCHEMA_HEADER = (
    "from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType\n"
    "from inference_schema.schema_decorators import input_schema\n\n"
    "def init():\n    pass\n\n"
    "@input_schema('data', StandardPythonParameterType([1, 2, 3]))\n"
)


def script_model(folder: Path, run_body: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "score.py").write_text(SCHEMA_HEADER + "def run(data):\n" + run_body)
    return folder


def rollout(fleet: Fleet, name: str, *args: str) -> dict:  # type: ignore[type-arg]
    done = fleet.cli("rollout", "create", name, *args, "--wait", "--output", "json")
    assert done.stdout.strip(), f"exit {done.returncode}: {done.stderr}"
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def base_v1(fleet: Fleet, digits_onnx: Path) -> None:
    fleet.register("digits", digits_onnx)
    view = rollout(fleet, "base", "--model", "digits:1", "--target", "*")
    assert view["state"] == "succeeded", view["reason"]


def test_three_stage_rollout_over_ten_agents_succeeds(fleet: Fleet, digits_onnx: Path, digits_onnx_v2: Path) -> None:
    agents = fleet.start_agents(10)
    base_v1(fleet, digits_onnx)
    fleet.register("digits", digits_onnx_v2)

    view = rollout(fleet, "v2", "--model", "digits:2", "--target", "*", "--stages", "10,50,100")

    assert view["state"] == "succeeded", view["reason"]
    assert [(s["stage"], s["devices"], s["result"]) for s in view["stage_log"]] == [
        (1, 1, "passed"), (2, 4, "passed"), (3, 5, "passed"),
    ]
    # the canary went first: the deterministic order of the rollout
    order = rollout_order("v2", [a.device_id for a in agents])
    assert view["devices"][0]["device_id"] == order[0]
    listing = fleet.cli_json("devices")
    assert [(d["device_id"], d["model"], d["online"]) for d in listing] == [
        (a.device_id, "digits:2", True) for a in agents
    ]
    r = httpx.post(f"http://127.0.0.1:{agents[3].scoring_port}/score", json={"data": ROWS}, timeout=10)
    assert r.status_code == 200 and r.headers["x-model-version"] == "2"


def test_warmup_failure_on_the_canary_stops_at_stage_one_others_untouched(
    fleet: Fleet, digits_onnx: Path, tmp_path: Path
) -> None:
    agents = fleet.start_agents(4)
    base_v1(fleet, digits_onnx)
    fleet.register("digits", script_model(tmp_path / "broken", "    raise ValueError('this model is broken')\n"))
    before = {a.device_id: fleet.device(a.device_id).desired_version for a in agents}  # type: ignore[union-attr]

    view = rollout(fleet, "bad", "--model", "digits:2", "--entry-script", "score.py", "--target", "*",
                   "--stages", "25,100", "--max-failure", "5%")

    assert view["state"] == "failed"
    assert "stage 1: 1 of 1 devices failed" in view["reason"]
    assert "warmup" in view["reason"] and "this model is broken" in view["reason"]
    canary = view["devices"][0]
    assert canary["state"] == "rolled_back" and canary["previous"] == "digits:1"
    assert [d["state"] for d in view["devices"][1:]] == ["waiting"] * 3
    for a in agents:
        d = fleet.wait_device(a.device_id, lambda d: d.active == "digits:1" and d.status == "applied", "back on v1")
        assert d.desired is not None and d.desired.key == "digits:1"
        if a.device_id != canary["device_id"]:
            assert d.desired_version == before[a.device_id]  # never sent anything
    confirmed = fleet.cli_json("rollout", "status", "bad")["devices"][0]
    assert confirmed["confirmed"] and confirmed["reason"].endswith("; it serves digits:1 again")


def test_errors_under_traffic_trip_the_telemetry_gate_and_roll_back(
    fleet: Fleet, digits_onnx: Path, tmp_path: Path
) -> None:
    agents = fleet.start_agents(2)
    base_v1(fleet, digits_onnx)
    # warm-up sends the schema's sample [1, 2, 3] and passes; real requests fail
    fleet.register("digits", script_model(
        tmp_path / "flaky", "    if data == [1, 2, 3]:\n        return [0]\n    raise RuntimeError('bad under traffic')\n"
    ))
    ports = [a.scoring_port for a in agents]
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                for port in ports:
                    with contextlib.suppress(httpx.HTTPError):
                        client.post(f"http://127.0.0.1:{port}/score", json={"data": ROWS})
                time.sleep(0.02)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        view = rollout(fleet, "flaky", "--model", "digits:2", "--entry-script", "score.py", "--target", "*",
                       "--stages", "50,100", "--soak", "20s", "--max-error-rate", "5%")
    finally:
        stop.set()
        sender.join(10)

    assert view["state"] == "failed"
    assert "stage 1: telemetry gate: error rate" in view["reason"]
    assert view["stage_log"][0]["seconds"] < 20  # caught during the soak, not at its end
    canary, other = view["devices"]
    assert canary["state"] == "rolled_back" and other["state"] == "waiting"
    fleet.wait_device(canary["device_id"], lambda d: d.active == "digits:1" and d.status == "applied", "rolled back")
    assert fleet.device(other["device_id"]).active == "digits:1"  # type: ignore[union-attr]


def test_killed_controller_resumes_and_finishes(fleet: Fleet, digits_onnx: Path, digits_onnx_v2: Path) -> None:
    agents = fleet.start_agents(3)
    base_v1(fleet, digits_onnx)
    fleet.register("digits", digits_onnx_v2)
    store = FleetStore(fleet.registry.home)

    cli = fleet.cli_background("rollout", "create", "r", "--model", "digits:2", "--target", "*",
                               "--stages", "34,67,100", "--soak", "1s", "--wait")
    wait_until(lambda: _stage(store, "r") >= 2, 60, "the rollout to reach stage 2")
    cli.send_signal(signal.SIGKILL)
    cli.wait(10)
    assert store.get("r").state == "running"  # nobody drives it now

    done = fleet.cli("rollout", "resume", "r", "--wait", "--output", "json")
    view = json.loads(done.stdout)
    assert view["state"] == "succeeded", (view["reason"], done.stderr)
    assert len(view["stage_log"]) == 3
    for a in agents:
        fleet.wait_device(a.device_id, lambda d: d.active == "digits:2", "on v2")


def _stage(store: FleetStore, name: str) -> int:
    try:
        return store.get(name).stage + 1
    except Exception:
        return 0


def test_offline_device_is_pending_then_converges_after_reconnect(
    fleet: Fleet, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    agents = fleet.start_agents(3)
    base_v1(fleet, digits_onnx)
    fleet.register("digits", digits_onnx_v2)
    sleeper = agents[1]
    sleeper.terminate()
    fleet.wait_device(sleeper.device_id, lambda d: not d.online, "offline")

    view = rollout(fleet, "v2", "--model", "digits:2", "--target", "*", "--timeout", "3s", "--max-failure", "34%")

    assert view["state"] == "succeeded", view["reason"]
    states = {d["device_id"]: (d["state"], d["reason"]) for d in view["devices"]}
    assert states[sleeper.device_id] == ("timeout", "offline, no report within 3s")
    # by hand: its last report (applied, about v1) is not taken for an answer about v2
    by_hand = fleet.cli("device", "set", sleeper.device_id, "--model", "digits:2", "--wait", "0.5s")
    assert by_hand.returncode == 0, by_hand.stderr
    assert by_hand.stdout.strip() == f"{sleeper.device_id}: desired digits:2; pending (device offline)"
    sleeper.start()
    fleet.wait_device(sleeper.device_id, lambda d: d.online and d.active == "digits:2", "converged after reconnect")
    listing = fleet.cli_json("devices", "--where", "reported.model.version = 2")
    assert len(listing) == 3
    # the rollout's status looks the timed-out device up again: converged, late; the verdict stays
    late = fleet.cli_json("rollout", "status", "v2")
    states = {d["device_id"]: (d["state"], d["reason"]) for d in late["devices"]}
    assert states[sleeper.device_id] == ("late", "applied after its stage timed out (offline, no report within 3s)")
    assert late["stage_log"] == view["stage_log"]


def test_conflicting_rollout_is_refused_and_tags_target_devices(
    fleet: Fleet, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    agents = fleet.start_agents(3, tags={"hw": "rpi4", "site": "lab"})  # declared in the agents' config
    fleet.register("digits", digits_onnx)
    fleet.register("digits", digits_onnx_v2)
    for a in agents[:2]:  # central tags win over declared ones
        assert fleet.cli("tag", a.device_id, "site=plant-1").returncode == 0
    listing = fleet.cli_json("devices", "--where", "tags.site = 'plant-1' AND tags.hw = 'rpi4'")
    assert [d["device_id"] for d in listing] == [a.device_id for a in agents[:2]]
    assert listing[0]["tags"] == {"hw": "rpi4", "site": "plant-1"}

    # a long soak keeps the first rollout active while the second is tried
    first = fleet.cli("rollout", "create", "slow", "--model", "digits:1", "--target", "tags.site = 'plant-1'",
                      "--soak", "1h")
    assert first.returncode == 0, first.stderr
    second = fleet.cli("rollout", "create", "clash", "--model", "digits:2", "--target", "*")
    assert second.returncode != 0
    assert f"conflicts with rollout 'slow' (running): device '{agents[0].device_id}' (and 1 more devices)" in second.stderr
    busy = fleet.cli("device", "set", agents[0].device_id, "--model", "digits:2")
    assert busy.returncode != 0 and f"device '{agents[0].device_id}' is in rollout 'slow' (running)" in busy.stderr
    assert "hint: wait for it to finish, or stop it with `modelfleet fleet rollout abort slow`" in busy.stderr
    assert fleet.cli("rollout", "abort", "slow").returncode == 0
    listed = fleet.cli_json("rollout", "list")
    assert [(r["name"], r["state"]) for r in listed] == [("slow", "aborted")]

    # without --wait a detached controller drives the rollout to the end
    started = fleet.cli("rollout", "create", "bg", "--model", "digits:2", "--target", "*")
    assert started.returncode == 0 and "running in the background" in started.stdout
    store = FleetStore(fleet.registry.home)
    wait_until(lambda: store.get("bg").state == "succeeded", 60, "bg to finish")
    assert fleet.cli_json("rollout", "status", "bg")["state"] == "succeeded"
    for a in agents:
        fleet.wait_device(a.device_id, lambda d: d.active == "digits:2", "on v2")

    # one device by hand, for debugging
    one = agents[2].device_id
    shown = fleet.cli_json("device", "set", one, "--model", "digits:1", "--wait", "30s")
    assert (shown["model"], shown["status"]) == ("digits:1", "applied")
    detail = fleet.cli_json("device", "show", one)
    assert detail["document"]["reported"]["model"]["version"] == 1
    missing = fleet.cli("device", "show", "no-such-device")
    assert missing.returncode != 0 and "no device 'no-such-device' has been seen" in missing.stderr


def test_offline_devices_keep_their_declared_tags_for_targeting(fleet: Fleet) -> None:
    agents = fleet.start_agents(3, prefix="tagged", tags={"site": "plant-9"})
    for a in agents:
        fleet.wait_device(a.device_id, lambda d: d.online, "online")
    agents[0].terminate()  # clean stop: the agent publishes its own offline presence
    agents[1].kill()  # vanished: the broker publishes the last will
    for a in agents[:2]:
        fleet.wait_device(a.device_id, lambda d: not d.online, "offline")

    # a fresh CLI process sees only the retained presence of the offline devices
    listing = fleet.cli_json("devices", "--where", "tags.site = 'plant-9'")
    by_id = {d["device_id"]: d for d in listing}
    assert sorted(by_id) == sorted(a.device_id for a in agents)
    for a in agents[:2]:
        assert by_id[a.device_id]["online"] is False
        assert by_id[a.device_id]["tags"] == {"site": "plant-9"}


def test_an_agent_that_joins_during_a_rollout_gets_the_version_with_the_next_stage(
    fleet: Fleet, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    from modelfleet.deployer.fleet.backends.mqtt import MqttFleetBackend, MqttFleetSettings
    from modelfleet.deployer.fleet.operations import resolve_model
    from modelfleet.deployer.fleet.rollout import RolloutEngine, RolloutSpec

    fleet.start_agents(2, tags={"site": "lab"})
    fleet.register("digits", digits_onnx)
    fleet.register("digits", digits_onnx_v2)
    v2 = resolve_model("digits:2", fleet.server.url, fleet.registry.home)
    store = FleetStore(fleet.registry.home)
    with MqttFleetBackend(MqttFleetSettings(port=fleet.broker_port)) as backend:
        engine = RolloutEngine(store, backend)
        engine.create(RolloutSpec("grow", v2, target="tags.site = 'lab'", stages=(50, 100)))
        # stepped by hand up to where stage 1 has passed and stage 2 is about to start
        wait_until(lambda: engine.step("grow").stage == 1, 60, "stage 1 to pass")
        [joiner] = fleet.start_agents(1, prefix="joiner", tags={"site": "lab"})
        wait_until(lambda: (d := backend.device(joiner.device_id)) is not None and d.online, 30, "the joiner seen")
        final = engine.drive("grow", poll=0.05, deadline=time.monotonic() + 60)
    assert final.state == "succeeded", final.reason
    view = engine.status("grow")
    row = next(d for d in view["devices"] if d["device_id"] == joiner.device_id)
    assert (row["stage"], row["state"], row["joined"]) == (2, "applied", True)
    fleet.wait_device(joiner.device_id, lambda d: d.active == "digits:2", "the joiner on v2")


def test_rollback_of_an_agent_that_had_no_model_unloads_it(fleet: Fleet, digits_onnx: Path) -> None:
    [agent] = fleet.start_agents(1, prefix="fresh")
    fleet.register("digits", digits_onnx)
    view = rollout(fleet, "first", "--model", "digits:1", "--target", "*")
    assert view["state"] == "succeeded", view["reason"]
    port = agent.scoring_port
    assert httpx.post(f"http://127.0.0.1:{port}/score", json={"data": ROWS}, timeout=10).status_code == 200

    done = fleet.cli("rollout", "rollback", "first")
    assert done.returncode == 0, done.stderr

    [row] = FleetStore(fleet.registry.home).devices("first")
    assert row.state == "rolled_back" and row.previous is None
    # the agent unloads and reports applied with nothing active, for the rollback's `$version`
    back = fleet.wait_device(
        agent.device_id,
        lambda d: row.desired_version is not None and d.outcome(row.desired_version) == "applied",
        "rolled back to no model",
    )
    assert back.active is None and back.serves_no_model_desired
    assert httpx.post(f"http://127.0.0.1:{port}/score", json={"data": ROWS}, timeout=10).status_code == 503
    table = fleet.cli("rollout", "status", "first")
    assert "(no model)" in table.stdout and "rolled back to no model (it had none before)" in table.stdout
    assert "it serves no model now" in table.stdout  # status looked the device's report up
