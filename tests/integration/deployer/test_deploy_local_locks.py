"""One operation at a time per service, and recovery from a CLI killed mid-operation.

Real `modelfleet` subprocesses against a local service whose score.py blocks in
`init()` while a flag file exists, so an operation stays in progress exactly as
long as the test wants.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import Result

from modelfleet.deployer.registry import Registry

Cli = Callable[..., Result]


@pytest.fixture
def hold(tmp_path: Path) -> Iterator[Path]:
    """A flag file: while it exists, the score.py below blocks in init()."""
    flag = tmp_path / "hold-init"
    yield flag
    flag.unlink(missing_ok=True)  # never leave a server blocked in init


@pytest.fixture
def slow_script(tmp_path: Path, hold: Path) -> Path:
    script = tmp_path / "src" / "score.py"
    script.parent.mkdir()
    script.write_text(
        "import os, time\n"
        "def init():\n"
        f"    while os.path.exists({str(hold)!r}):\n"
        "        time.sleep(0.05)\n"
        "def run(data):\n"
        "    return {'pid': os.getpid()}\n"
    )
    return script


def _modelfleet(home: Path, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, MODELFLEET_HOME=str(home))
    return subprocess.Popen(
        [sys.executable, "-m", "modelfleet.deployer", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(home: Path, *args: str) -> tuple[int, str, str]:
    proc = _modelfleet(home, *args)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _poll(check: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def _owned_by(registry: Registry, service: str, pid: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            _, running = registry.get_service_operation(service)
        except Exception:
            return False
        return running is not None and running.owner is not None and running.owner.pid == pid

    return check


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _server_pids(home: Path, service: str) -> list[int]:
    """Scoring servers started for `service` (its admin key path is on their command line)."""
    marker = str((home / "services" / service / "secrets" / "admin.key").resolve()).encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker in entry.joinpath("cmdline").read_bytes() and _alive(int(entry.name)):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def test_a_second_operation_is_refused_while_an_update_runs(
    cli: Cli, digits_models: Registry, home: Path, hold: Path, slow_script: Path
) -> None:
    deployed = cli("deploy", "busy", "-m", "digits:1", "--entry-script", str(slow_script))
    assert deployed.exit_code == 0, deployed.output
    hold.touch()
    first = _modelfleet(home, "service", "update", "busy", "-m", "digits:2")
    try:
        assert _poll(_owned_by(digits_models, "busy", first.pid)), first.stderr
        busy = f"error: service 'busy' is being updated by pid {first.pid} since "
        hint = f"hint: wait for it to finish, or stop that command (kill {first.pid}) and try again"
        for args in (
            ("service", "update", "busy", "-m", "digits:1"),
            ("service", "delete", "busy"),
            ("deploy", "busy", "-m", "digits:1"),
        ):
            code, _, err = _run(home, *args)
            assert code == 1 and busy in err and hint in err, (args, err)
        assert first.poll() is None  # refused at once, not queued behind the update
        code, _, err = _run(home, "model", "delete", "digits:2")  # the version being put in place
        assert code == 1 and "error: model digits:2 is used by service(s) busy" in err, err
        shown = json.loads(cli("service", "show", "busy", "-o", "json").stdout)
        assert shown["state"] == "updating" and shown["models"] == ["digits:1"]
        assert f"being updated by pid {first.pid}" in shown["detail"]
    finally:
        hold.unlink(missing_ok=True)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    shown = json.loads(cli("service", "show", "busy", "-o", "json").stdout)
    assert shown["state"] == "healthy" and shown["models"] == ["digits:2"]
    again = cli("service", "update", "busy", "-m", "digits:1", "-o", "json")
    assert again.exit_code == 0, again.output  # the lock went with the first update
    assert json.loads(again.stdout)["models"] == ["digits:1"]


def test_a_deploy_killed_mid_init_shows_failed_and_can_be_deployed_again(
    cli: Cli, digits_models: Registry, home: Path, hold: Path, slow_script: Path
) -> None:
    hold.touch()
    deploy = _modelfleet(home, "deploy", "halfway", "-m", "digits:1", "--entry-script", str(slow_script))
    assert _poll(lambda: bool(_server_pids(home, "halfway"))), deploy.stderr
    orphans = _server_pids(home, "halfway")
    _kill(deploy)

    died = f"interrupted: the modelfleet process (pid {deploy.pid}) running deploy died"
    shown = json.loads(cli("service", "show", "halfway", "-o", "json").stdout)
    assert shown["state"] == "failed" and shown["detail"] == died
    listed = json.loads(cli("service", "list", "-o", "json").stdout)
    assert [(s["name"], s["state"], s["detail"]) for s in listed] == [("halfway", "failed", died)]
    table = cli("service", "show", "halfway")
    assert "failed" in table.stdout and died in table.stdout

    refused = cli("service", "update", "halfway", "-m", "digits:2")
    assert refused.exit_code == 1
    assert f"error: service 'halfway' was never fully deployed ({died})" in refused.stderr
    assert "hint: deploy it again, or delete it" in refused.stderr

    hold.unlink()
    again = cli("deploy", "halfway", "-m", "digits:2", "--entry-script", str(slow_script), "-o", "json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["models"] == ["digits:2"]
    assert _poll(lambda: not any(_alive(pid) for pid in orphans), 15)  # the orphan was stopped
    assert _server_pids(home, "halfway") == [json.loads(again.stdout)["pid"]]
    assert cli("service", "delete", "halfway").exit_code == 0


def test_a_deploy_killed_mid_init_can_be_deleted(
    cli: Cli, digits_models: Registry, home: Path, hold: Path, slow_script: Path
) -> None:
    hold.touch()
    deploy = _modelfleet(home, "deploy", "dropped", "-m", "digits:1", "--entry-script", str(slow_script))
    assert _poll(lambda: bool(_server_pids(home, "dropped"))), deploy.stderr
    _kill(deploy)
    orphans = _server_pids(home, "dropped")
    # Another process naming the admin key file (not as the server's option) is no
    # server: e.g. a `tail` of it run from a shell (its own process group).
    key_file = home / "services" / "dropped" / "secrets" / "admin.key"
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", str(key_file.resolve())],
        start_new_session=True,
    )
    try:
        hold.unlink()  # the orphan stops on SIGTERM once init() returns, not after the kill timeout
        deleted = cli("service", "delete", "dropped")
        assert deleted.exit_code == 0, deleted.output
        assert "stopping the scoring server left by an interrupted deploy" in deleted.stderr
        assert _poll(lambda: not any(_alive(pid) for pid in orphans), 15)
        assert bystander.poll() is None, "only the scoring server is stopped"
    finally:
        bystander.kill()
        bystander.wait(10)
    assert json.loads(cli("service", "list", "-o", "json").stdout) == []
    assert not (home / "services" / "dropped").exists()


def test_an_update_killed_mid_load_shows_failed_and_a_new_update_takes_over(
    cli: Cli, digits_models: Registry, home: Path, hold: Path, slow_script: Path
) -> None:
    deployed = cli("deploy", "swapping", "-m", "digits:1", "--entry-script", str(slow_script))
    assert deployed.exit_code == 0, deployed.output
    hold.touch()
    update = _modelfleet(home, "service", "update", "swapping", "-m", "digits:2")
    assert _poll(_owned_by(digits_models, "swapping", update.pid)), update.stderr
    _kill(update)

    shown = json.loads(cli("service", "show", "swapping", "-o", "json").stdout)
    assert shown["state"] == "failed"
    assert shown["detail"] == (
        f"interrupted: the modelfleet process (pid {update.pid}) running update died"
    )
    assert shown["models"] == ["digits:1"]  # the update never finished

    hold.unlink()
    again = cli("service", "update", "swapping", "-m", "digits:2")
    assert again.exit_code == 0, again.output
    assert f"taking over (interrupted: the modelfleet process (pid {update.pid})" in again.stderr
    shown = json.loads(cli("service", "show", "swapping", "-o", "json").stdout)
    assert shown["state"] == "healthy" and shown["models"] == ["digits:2"]
    called = json.loads(cli("service", "call", "swapping", "-d", "{}", "-o", "json").stdout)
    assert called["model_version"] == "2"


def test_an_update_whose_init_hangs_ends_as_the_servers_refusal_not_a_client_timeout(
    cli: Cli,
    digits_models: Registry,
    hold: Path,
    slow_script: Path,
    request_body: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server's load time limit is the deployer's wait: it refuses (old version serving)
    before the client gives up, so registry and server never disagree about what serves."""
    monkeypatch.setenv("MODELFLEET_LOCAL_READY_TIMEOUT", "3")
    deployed = cli("deploy", "hung", "-m", "digits:1", "--entry-script", str(slow_script))
    assert deployed.exit_code == 0, deployed.output
    hold.touch()
    update = cli("service", "update", "hung", "-m", "digits:2")
    assert update.exit_code == 1
    assert "the new version was refused (422)" in update.stderr, update.stderr
    assert "did not finish within 3 s" in update.stderr, update.stderr
    hold.unlink()  # the hung init() returns now; its late load must be dropped, not served
    shown = json.loads(cli("service", "show", "hung", "-o", "json").stdout)
    assert shown["state"] == "healthy" and shown["models"] == ["digits:1"]
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        called = cli("service", "call", "hung", "--data", request_body, "-o", "json")
        assert called.exit_code == 0, called.output
        assert json.loads(called.stdout)["model_version"] == "1"
