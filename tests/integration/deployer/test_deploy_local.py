"""`modelfleet deploy --target local` and the service lifecycle, run as a user would."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from helpers_traffic import Traffic
from typer.testing import Result

from modelfleet.deployer.registry import Registry

Cli = Callable[..., Result]


def _deploy(cli: Cli, name: str, *args: str) -> dict[str, object]:
    out = cli("deploy", name, "-m", "digits:1", "-o", "json", *args)
    assert out.exit_code == 0, out.output
    view: dict[str, object] = json.loads(out.stdout)
    return view


def _poll(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_deploy_call_with_and_without_key_regen_and_delete(
    cli: Cli, digits_models: Registry, request_body: str, tmp_path: Path
) -> None:
    dc = tmp_path / "deploymentconfig.json"
    dc.write_text(json.dumps({"computeType": "local", "authEnabled": True,
                              "containerResourceRequirements": {"cpu": 1, "memoryInGB": 1}}))  # fmt: skip
    view = _deploy(cli, "digits-svc", "-dc", str(dc))
    assert view["state"] == "healthy" and view["models"] == ["digits:1"]
    assert view["target"] == "local" and view["auth_enabled"] is True
    uri = str(view["scoring_uri"])

    called = cli("service", "call", "digits-svc", "--data", request_body, "-o", "json")
    assert called.exit_code == 0, called.output
    answer = json.loads(called.stdout)
    assert answer["model_version"] == "1" and answer["body"]["label"] == [0, 1]

    refused = cli("service", "call", "digits-svc", "--data", request_body, "--no-auth")
    assert refused.exit_code == 1
    assert "error: digits-svc refused the call (401): missing or wrong key" in refused.stderr
    assert "hint: see the keys with `modelfleet service keys digits-svc`" in refused.stderr
    assert httpx.post(uri, content=request_body).status_code == 401

    keys = json.loads(cli("service", "keys", "digits-svc", "-o", "json").stdout)
    swagger = httpx.get(str(view["swagger_uri"]), headers={"Authorization": f"Bearer {keys['primary']}"})
    assert swagger.status_code == 200 and "paths" in swagger.json()
    regen = cli("service", "regen-key", "digits-svc", "--key", "primary", "-o", "json")
    new = json.loads(regen.stdout)
    assert new["primary"] != keys["primary"] and new["secondary"] == keys["secondary"]

    def status_with(key: str) -> int:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        return httpx.post(uri, content=request_body, headers=headers).status_code

    assert _poll(lambda: status_with(keys["primary"]) == 401), "old key still accepted"
    assert status_with(new["primary"]) == 200 and status_with(keys["secondary"]) == 200
    assert cli("service", "call", "digits-svc", "-d", request_body).exit_code == 0

    bad_key = cli("service", "regen-key", "digits-svc", "--key", "tertiary")
    assert bad_key.exit_code == 1 and "error: unknown key 'tertiary'" in bad_key.stderr

    listed = json.loads(cli("service", "list", "-o", "json").stdout)
    assert [(s["name"], s["state"]) for s in listed] == [("digits-svc", "healthy")]
    logs = cli("service", "logs", "digits-svc").stdout
    assert "event=ready" in logs

    pid = int(str(view["pid"]))
    deleted = cli("service", "delete", "digits-svc")
    assert deleted.exit_code == 0 and "deleted digits-svc" in deleted.stdout
    assert json.loads(cli("service", "list", "-o", "json").stdout) == []
    assert not _alive(pid)
    gone = cli("service", "show", "digits-svc")
    assert gone.exit_code == 1 and "error: service 'digits-svc' does not exist" in gone.stderr


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_update_under_traffic_fails_no_request(
    cli: Cli, digits_models: Registry, request_body: str
) -> None:
    view = _deploy(cli, "digits-live")
    key = json.loads(cli("service", "keys", "digits-live", "-o", "json").stdout)["primary"]
    headers = {"Authorization": f"Bearer {key}"}
    with Traffic(str(view["scoring_uri"]), request_body, headers=headers) as traffic:
        assert _poll(lambda: len(traffic.answers) > 50)
        updated = cli("service", "update", "digits-live", "-m", "digits:2", "-o", "json")
        assert updated.exit_code == 0, updated.output
        assert json.loads(updated.stdout)["models"] == ["digits:2"]
        seen = len(traffic.answers)
        assert _poll(lambda: len(traffic.answers) > seen + 50)
    failed = [a for a in traffic.answers if a.status != 200]
    assert failed == [], failed[:5]
    versions = [a.version for a in traffic.answers]
    assert "1" in versions and versions[-1] == "2"
    assert json.loads(cli("service", "show", "digits-live", "-o", "json").stdout)["models"] == [
        "digits:2"
    ]


def test_entry_script_deploy_serves_with_azureml_model_dir(
    cli: Cli, digits_models: Registry, request_body: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "score.py").write_text(
        "import json, os\n"
        "import numpy as np\n"
        "import onnxruntime as ort\n"
        "def init():\n"
        "    global sess\n"
        "    sess = ort.InferenceSession(os.path.join(os.environ['AZUREML_MODEL_DIR'], 'model.onnx'))\n"
        "def run(raw):\n"
        "    x = np.array(json.loads(raw)['data'], dtype=np.float32)\n"
        "    return {'digits': sess.run(None, {sess.get_inputs()[0].name: x})[0].tolist()}\n"
    )
    ic = tmp_path / "inferenceconfig.json"
    ic.write_text(json.dumps({"entryScript": "score.py", "sourceDirectory": "src",
                              "runtime": "python"}))  # fmt: skip
    _deploy(cli, "scripted", "-ic", str(ic))
    called = cli("service", "call", "scripted", "--data", request_body)
    assert called.exit_code == 0, called.output
    assert json.loads(called.stdout) == {"digits": [0, 1]}
    (tmp_path / "request.json").write_text(request_body)
    for data in (str(tmp_path / "request.json"), f"@{tmp_path / 'request.json'}"):
        from_file = cli("service", "call", "scripted", "--data", data)
        assert json.loads(from_file.stdout) == {"digits": [0, 1]}
    missing = cli("service", "call", "scripted", "--data", f"@{tmp_path / 'nope.json'}")
    assert missing.exit_code == 1 and "error: cannot read --data file" in missing.stderr
    updated = cli("service", "update", "scripted", "-m", "digits:2")
    assert updated.exit_code == 0, updated.output
    assert json.loads(cli("service", "call", "scripted", "-d", request_body).stdout) == {
        "digits": [0, 1]
    }


def test_score_py_syntax_error_fails_fast_and_leaves_nothing(
    cli: Cli, digits_models: Registry, home: Path, tmp_path: Path
) -> None:
    (tmp_path / "score.py").write_text("def init():\n    pass\ndef run(data)\n    return data\n")
    started = time.monotonic()
    out = cli("deploy", "broken", "-m", "digits:1", "--entry-script", str(tmp_path / "score.py"))
    assert out.exit_code == 1
    assert "error: score.py line 3: expected ':': def run(data)" in out.stderr
    assert time.monotonic() - started < 5
    assert json.loads(cli("service", "list", "-o", "json").stdout) == []
    assert not (home / "services" / "broken").exists()


def test_crashing_init_reports_the_log_and_leaves_nothing(
    cli: Cli, digits_models: Registry, home: Path, tmp_path: Path
) -> None:
    (tmp_path / "score.py").write_text(
        "def init():\n    raise RuntimeError('weights are corrupt')\ndef run(data):\n    return data\n"
    )
    out = cli("deploy", "crashy", "-m", "digits:1", "--entry-script", str(tmp_path / "score.py"))
    assert out.exit_code == 1
    assert "error: the scoring server exited with code" in out.stderr
    assert "weights are corrupt" in out.stderr
    assert json.loads(cli("service", "list", "-o", "json").stdout) == []
    assert not (home / "services" / "crashy").exists()


def test_a_taken_port_is_refused_before_anything_starts(
    cli: Cli, digits_models: Registry
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli("deploy", "clash", "-m", "digits:1", "--port", str(port))
    assert out.exit_code == 1
    assert f"error: port {port} on 127.0.0.1 is already in use" in out.stderr
    assert "hint: choose another port" in out.stderr
    assert json.loads(cli("service", "list", "-o", "json").stdout) == []


def test_bad_deploy_input_names_what_is_wrong(
    cli: Cli, digits_models: Registry, tmp_path: Path
) -> None:
    broken = tmp_path / "dc.json"
    broken.write_text('{"port": 8890,,}')
    out = cli("deploy", "svc", "-m", "digits:1", "-dc", str(broken))
    assert out.exit_code == 2 and f"error: {broken} is not valid JSON" in out.stderr

    unknown = tmp_path / "dc2.json"
    unknown.write_text(json.dumps({"containerResourceRequirements": {"cpu": 1, "memoryGB": 1}}))
    out = cli("deploy", "svc", "-m", "digits:1", "-dc", str(unknown))
    assert out.exit_code == 2
    assert "error: dc2.json: unknown field 'containerResourceRequirements.memoryGB'" in out.stderr
    assert "memoryInGB" in out.stderr  # the hint lists the known fields

    out = cli("deploy", "svc", "-m", "digits:9")
    assert out.exit_code == 1 and "error: model 'digits' has no version 9" in out.stderr
    out = cli("deploy", "svc", "-m", "digits:1", "--target", "mainframe")
    assert out.exit_code == 1 and "error: unknown deployment target 'mainframe'" in out.stderr
    assert "available targets: docker, local" in out.stderr
    out = cli("deploy", "Bad_Name", "-m", "digits:1")
    assert out.exit_code == 1 and "error: invalid service name 'Bad_Name'" in out.stderr
    out = cli("service", "call", "svc", "-d", "{not json")
    assert out.exit_code == 1 and "error: --data is neither an existing file nor valid JSON" in (
        out.stderr
    )
    assert json.loads(cli("service", "list", "-o", "json").stdout) == []


def test_dead_process_shows_failed_with_last_log_lines(
    cli: Cli, digits_models: Registry, request_body: str
) -> None:
    view = _deploy(cli, "doomed")
    os.kill(int(str(view["pid"])), signal.SIGKILL)
    assert _poll(lambda: not _alive(int(str(view["pid"]))))
    shown = cli("service", "show", "doomed")
    assert shown.exit_code == 0
    assert "failed" in shown.stdout and "last log lines:" in shown.stdout
    assert "event=ready" in shown.stdout
    listed = json.loads(cli("service", "list", "-o", "json").stdout)
    assert listed[0]["state"] == "failed" and "is not running" in listed[0]["detail"]
    refused = cli("service", "update", "doomed", "-m", "digits:2")
    assert refused.exit_code == 1 and "is not running, so it cannot be updated" in refused.stderr
    assert cli("service", "delete", "doomed").exit_code == 0


def test_model_delete_is_refused_while_deployed(cli: Cli, digits_models: Registry) -> None:
    _deploy(cli, "inuse")
    out = cli("model", "delete", "digits:1")
    assert out.exit_code == 1
    assert "error: model digits:1 is used by service(s) inuse" in out.stderr
    assert "hint: delete or update the service first, or pass --force" in out.stderr
    shown = json.loads(cli("model", "show", "digits:1", "-o", "json").stdout)
    assert shown["services"] == ["inuse"]


def test_logs_follow_ends_when_the_process_dies(
    cli: Cli, digits_models: Registry, home: Path
) -> None:
    from modelfleet.deployer.services import ServiceManager

    view = _deploy(cli, "followed")
    manager = ServiceManager(Registry(home))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(manager.logs("followed", follow=True)))
    reader.start()
    assert _poll(lambda: any("event=ready" in line for line in lines))
    assert reader.is_alive()  # following: waits for more lines
    os.kill(int(str(view["pid"])), signal.SIGTERM)
    reader.join(15)
    assert not reader.is_alive()
    tail = cli("service", "logs", "followed", "--tail", "1")
    assert tail.exit_code == 0 and len(tail.stdout.splitlines()) == 1


def test_update_to_a_broken_model_is_refused_and_the_old_version_keeps_serving(
    cli: Cli, digits_models: Registry, request_body: str, tmp_path: Path
) -> None:
    _deploy(cli, "steady")
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"this is not an onnx graph")
    assert cli("model", "register", "-n", "digits", "-p", str(broken)).exit_code == 0
    out = cli("service", "update", "steady", "-m", "digits:3")
    assert out.exit_code == 1
    assert "error: the new version was refused (422)" in out.stderr
    assert "the previous version keeps serving" in out.stderr
    shown = json.loads(cli("service", "show", "steady", "-o", "json").stdout)
    assert shown["state"] == "healthy" and shown["models"] == ["digits:1"]
    called = json.loads(cli("service", "call", "steady", "-d", request_body, "-o", "json").stdout)
    assert called["model_version"] == "1"


def test_deploying_a_taken_name_is_refused(cli: Cli, digits_models: Registry) -> None:
    first = _deploy(cli, "taken")
    out = cli("deploy", "taken", "-m", "digits:2")
    assert out.exit_code == 1
    assert "error: service 'taken' already exists (state healthy)" in out.stderr
    assert "modelfleet service update" in out.stderr  # the hint says what to do instead
    shown = json.loads(cli("service", "show", "taken", "-o", "json").stdout)
    assert shown["models"] == ["digits:1"] and shown["pid"] == first["pid"]


def test_az_ml_model_deploy_spelling_works(
    cli: Cli, digits_models: Registry, tmp_path: Path
) -> None:
    ic = tmp_path / "inferenceconfig.json"
    ic.write_text(json.dumps({"runtime": "python"}))
    dc = tmp_path / "deploymentconfig.json"
    dc.write_text(json.dumps({"computeType": "local", "authEnabled": False}))
    out = cli("model", "deploy", "-m", "digits:2", "-n", "azstyle", "-ic", str(ic), "-dc", str(dc))
    assert out.exit_code == 0, out.output
    assert "auth_enabled  False" in out.stdout
    shown = json.loads(cli("service", "show", "azstyle", "-o", "json").stdout)
    assert httpx.post(str(shown["scoring_uri"]), json={"data": [[0.0] * 64]}).status_code == 200
    no_keys = cli("service", "keys", "azstyle")
    assert no_keys.exit_code == 1 and "has authentication disabled" in no_keys.stderr
    lines = cli("service", "logs", "azstyle", "-o", "json", "--tail", "2").stdout.splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["service"] == "azstyle"


def test_replicas_run_as_workers_and_an_update_under_traffic_swaps_them_all(
    cli: Cli, digits_models: Registry, request_body: str, tmp_path: Path
) -> None:
    dc = tmp_path / "deploymentconfig.json"
    dc.write_text(json.dumps({"numReplicas": 2, "authEnabled": False,
                              "autoScaler": {"autoscaleEnabled": True, "maxReplicas": 4}}))  # fmt: skip
    out = cli("deploy", "scaled", "-m", "digits:1", "-dc", str(dc))
    assert out.exit_code == 0, out.output
    note = (
        "autoScaler ignored: the local target runs a fixed number of worker processes "
        "(numReplicas, here 2)"
    )
    assert f"-> {note}" in out.stderr
    shown = json.loads(cli("service", "show", "scaled", "-o", "json").stdout)
    assert shown["workers"] == 2 and shown["note"] == note
    pid = int(shown["pid"])
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 2  # numReplicas 2: serve --workers 2, two forked workers

    uri = str(shown["scoring_uri"])
    with Traffic(uri, request_body) as traffic:
        assert _poll(lambda: len(traffic.answers) > 50)
        updated = cli("service", "update", "scaled", "-m", "digits:2", "-o", "json")
        assert updated.exit_code == 0, updated.output
        seen = len(traffic.answers)
        assert _poll(lambda: len(traffic.answers) > seen + 100)
    assert traffic.failures == []
    versions = [a.version for a in traffic.answers]
    assert "1" in versions[:seen]
    # after the update returned: only requests already in flight (one per client) may be old
    assert set(versions[seen + len(traffic.threads) :]) == {"2"}
    fresh = []
    for _ in range(40):  # new connections: both workers answer
        with httpx.Client(timeout=10) as c:
            fresh.append(c.post(uri, content=request_body, headers={"Content-Type": "application/json"}))
    assert {(r.status_code, r.headers["x-model-version"]) for r in fresh} == {(200, "2")}
    assert len({r.headers["x-request-id"].split("-")[0] for r in fresh}) == 2

    assert json.loads(cli("service", "show", "scaled", "-o", "json").stdout)["note"] == note
    table = cli("service", "show", "scaled").stdout
    assert "workers" in table and "autoScaler ignored" in table
    plain = _deploy(cli, "unscaled", "--no-auth")
    assert plain["workers"] == 1 and "note" not in plain
    pid = int(plain["pid"])
    assert Path(f"/proc/{pid}/task/{pid}/children").read_text().split() == []  # one process serves


def test_container_image_fields_are_not_applied_locally_and_show_why(
    cli: Cli, digits_models: Registry, tmp_path: Path
) -> None:
    steps = tmp_path / "steps.docker"
    steps.write_text("ENV FOO=bar\n")
    ic = tmp_path / "inferenceconfig.json"
    ic.write_text(json.dumps({"runtime": "python", "extraDockerfileSteps": str(steps)}))
    out = cli("deploy", "imagefields", "-m", "digits:1", "-ic", str(ic), "--no-auth")
    assert out.exit_code == 0, out.output
    note = (
        "extraDockerfileSteps ignored: they shape a container image; "
        "the local target runs in this machine's Python environment (use --target docker)"
    )
    assert f"-> {note}" in out.stderr
    assert json.loads(cli("service", "show", "imagefields", "-o", "json").stdout)["note"] == note


def test_regen_key_at_once_on_both_keys_loses_neither(
    cli: Cli, digits_models: Registry, home: Path
) -> None:
    """Two regen-key at once (primary in one, secondary in another) each read, change
    and write the keys file: without a lock, one writes back the other's old key."""
    import fcntl

    from modelfleet.deployer.services import ServiceManager

    _deploy(cli, "rotating")
    manager = ServiceManager(Registry(home))
    keys_file = Path(str(manager.registry.get_service("rotating").target_data["keys_file"]))
    lock = os.open(str(keys_file) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # hold the lock: both regenerations must queue behind it
    results: dict[str, str] = {}

    def regen(which: str) -> None:
        results[which] = ServiceManager(Registry(home)).regen_key("rotating", which)[which]  # type: ignore[arg-type]

    threads = [threading.Thread(target=regen, args=(which,)) for which in ("primary", "secondary")]
    before = keys_file.read_bytes()
    for t in threads:
        t.start()
    time.sleep(0.3)  # give them time to (wrongly) write while the lock is held
    assert keys_file.read_bytes() == before and all(t.is_alive() for t in threads)
    os.close(lock)
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert json.loads(keys_file.read_text()) == results  # both new keys kept
