"""The local target: the scoring server as a managed background process.

The process runs in its own session (it outlives the CLI), writes to
`<workdir>/server.log`, and reads its keys from `<workdir>/secrets/keys.json`,
which `service regen-key` rewrites atomically (the server reloads it).
`update` posts the new model to the server's admin load endpoint: it loads
and warms beside the running version, and traffic moves only once it is ready.
numReplicas N runs `serve --workers N`: N worker processes share the port, and
one admin load swaps them all (in two phases) before it answers.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelfleet.deployer.errors import DeploymentError
from modelfleet.deployer.targets import scoring_admin
from modelfleet.deployer.targets.base import (
    ModelBinding,
    Progress,
    ServiceRecord,
    ServiceSpec,
    ServiceStatus,
    updated_record,
)
from modelfleet.deployer.targets.service_files import (
    ADMIN_KEY_FILE,
    check_entry_script,
    free_port,
    write_admin_key,
    write_keys,
)

LOG_FILE = "server.log"
LAST_LOG_LINES = 20
STOP_TIMEOUT_S = 10.0


def ready_timeout() -> float:
    return float(os.environ.get("MODELFLEET_LOCAL_READY_TIMEOUT", "120"))


class LocalTargetError(DeploymentError):
    """A local deployment failed; the message says which step and why."""


# ---------------------------------------------------------------- helpers


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the server binds: connections of a previous server on this port may
        # linger in TIME_WAIT, which must not count as "taken"; a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            return False
    return True


def tail(path: Path, n: int = LAST_LOG_LINES) -> tuple[str, ...]:
    try:
        with path.open("r", errors="replace") as fh:
            return tuple(line.rstrip("\n") for line in deque(fh, maxlen=n))
    except OSError:
        return ()


def _is_running(pid: int, marker: str) -> bool:
    """Alive, not a zombie, and still our server (pids get reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and marker in cmdline


def _processes_with(marker: str) -> list[int]:
    """Pids of live processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        if entry.name != str(os.getpid()) and _is_running(int(entry.name), marker):
            found.append(int(entry.name))
    return found


def model_dir_for(models: tuple[ModelBinding, ...], workdir: Path) -> Path:
    """The folder the server sees as AZUREML_MODEL_DIR.

    One model: its own folder. Several: `<name>/<version>/` links under a
    release folder, the layout Azure ML uses for multi-model deployments.
    """
    if len(models) == 1:
        path = models[0].path
        return path if path.is_dir() else path.parent
    digest = hashlib.sha256(
        "\n".join(f"{m.name}:{m.version}:{m.sha256}" for m in models).encode()
    ).hexdigest()[:16]
    release = workdir / "releases" / digest
    if not release.is_dir():
        tmp = release.with_name(f".{digest}.{os.getpid()}")
        for m in models:
            link = tmp / m.name / str(m.version)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(m.path if m.path.is_dir() else m.path.parent)
        os.replace(tmp, release)
    return release


def scaling_note(spec: ServiceSpec) -> str:
    """What of the configs the local target does not apply, and why (empty when nothing).

    numReplicas N is applied as `serve --workers N` (an update's load request swaps
    every worker, see the scoring package's workers.py); autoScaler is not: the
    worker count is fixed while the server runs. Image fields need a container:
    the local target runs in this machine's Python environment.
    """
    dep, inf = spec.deployment, spec.inference
    notes = []
    if dep.autoscale_enabled:
        notes.append(
            "autoScaler ignored: the local target runs a fixed number of worker processes "
            f"(numReplicas, here {dep.replicas})"
        )
    image = [
        field
        for field, value in (("baseImage", inf.base_image), ("extraDockerfileSteps", inf.extra_dockerfile_steps))
        if value
    ]
    if image:
        notes.append(
            f"{' and '.join(image)} ignored: they shape a container image; "
            "the local target runs in this machine's Python environment (use --target docker)"
        )
    return "; ".join(notes)


def _entry_script_path(spec: ServiceSpec) -> Path | None:
    inf = spec.inference
    if inf.entry_script is None:
        return None
    return ((inf.source_directory or Path.cwd()) / inf.entry_script).resolve()


def _is_ready(port: int) -> bool:
    return scoring_admin.is_ready(port, timeout=2)


def _stop_process(pid: int, marker: str) -> None:
    if not _is_running(pid, marker):
        return
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _is_running(pid, marker):
                return
            time.sleep(0.05)
    raise LocalTargetError(f"server process {pid} did not stop")


# ---------------------------------------------------------------- the target


class LocalTarget:
    """`DeploymentTarget` running `python -m modelfleet.scoring serve` on this machine."""

    name = "local"

    def deploy(self, spec: ServiceSpec, progress: Progress) -> ServiceRecord:
        if not spec.models:
            raise LocalTargetError("a service needs at least one model")
        check_entry_script(spec, LocalTargetError)
        port = spec.deployment.port
        if port is not None and not _port_free(port):
            raise LocalTargetError(
                f"port {port} on 127.0.0.1 is already in use",
                hint="choose another port (--port or 'port' in deploymentconfig.json), "
                "or leave it out to pick a free one",
            )
        port = port or free_port()
        note = scaling_note(spec)
        if note:
            progress(note)
        workdir = spec.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        keys_file = write_keys(spec, workdir)
        admin_file = write_admin_key(workdir)
        model_dir = model_dir_for(spec.models, workdir)
        entry = _entry_script_path(spec)
        first = spec.models[0]
        cmd = [
            sys.executable, "-m", "modelfleet.scoring", "serve",
            "--model-dir", str(model_dir),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--model-name", first.name,
            "--model-version", str(first.version),
            "--admin-key-file", str(admin_file),
            "--scoring-timeout-ms", str(spec.deployment.scoring_timeout_ms),
            "--max-concurrent-requests", str(spec.deployment.max_concurrent_requests),
            "--workers", str(spec.deployment.replicas),
            *scoring_admin.load_timeout_args(ready_timeout()),
        ]  # fmt: skip
        if entry is not None:
            cmd += ["--entry-script", str(entry)]
        if keys_file is not None:
            cmd += ["--keys-file", str(keys_file)]
        log_path = workdir / LOG_FILE
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cwd = spec.inference.source_directory or workdir
        progress(f"starting the scoring server on 127.0.0.1:{port}")
        with log_path.open("ab") as log_fh:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                cwd=str(cwd),
                env=env,
                start_new_session=True,  # outlives the CLI; stopped as a process group
            )
        marker = str(admin_file)
        base = f"http://127.0.0.1:{port}"
        try:
            self._wait_ready(proc, port, log_path, progress)
            progress(f"{spec.name} is ready at {base}/score")
        except BaseException:  # Ctrl-C included: never leave a server nobody knows of
            _stop_process(proc.pid, marker)
            proc.wait(5)
            raise
        return ServiceRecord(
            name=spec.name,
            target=self.name,
            state="healthy",
            scoring_uri=f"{base}/score",
            swagger_uri=f"{base}/swagger.json",
            models=[f"{m.name}:{m.version}" for m in spec.models],
            target_data={
                "pid": proc.pid,
                "port": port,
                "workdir": str(workdir),
                "log_file": str(log_path),
                "keys_file": str(keys_file) if keys_file else None,
                "admin_key_file": str(admin_file),
                "model_dir": str(model_dir),
                "entry_script": str(entry) if entry else None,
                "workers": spec.deployment.replicas,
                "note": note or None,
            },
        )

    @staticmethod
    def _wait_ready(
        proc: subprocess.Popen[bytes], port: int, log_path: Path, progress: Progress
    ) -> None:
        timeout = ready_timeout()
        deadline = time.monotonic() + timeout
        next_note = time.monotonic() + 5
        progress("waiting for the model to load and warm up")
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                lines = tail(log_path)
                last = next((ln for ln in reversed(lines) if ln.strip()), "(no output)")
                raise LocalTargetError(
                    f"the scoring server exited with code {code} before it was ready: {last}",
                    hint=f"full log: {log_path}\n" + "\n".join(lines[-10:]),
                )
            if _is_ready(port):
                return
            if time.monotonic() >= next_note:
                progress(
                    f"still waiting for readiness ({timeout - (deadline - time.monotonic()):.0f}s)"
                )
                next_note += 5
            time.sleep(0.1)
        raise LocalTargetError(
            f"the scoring server was not ready after {timeout:.0f}s",
            hint=f"see {log_path}; raise MODELFLEET_LOCAL_READY_TIMEOUT for slow models",
        )

    def update(self, record: ServiceRecord, spec: ServiceSpec, progress: Progress) -> ServiceRecord:
        data: dict[str, Any] = dict(record.target_data)
        if not _is_running(int(data["pid"]), str(data["admin_key_file"])):
            raise LocalTargetError(
                f"service {record.name} is not running, so it cannot be updated in place",
                hint=f"delete it and deploy again (modelfleet service delete {record.name})",
            )
        check_entry_script(spec, LocalTargetError)
        workdir = Path(data["workdir"])
        model_dir = model_dir_for(spec.models, workdir)
        entry = _entry_script_path(spec)
        first = spec.models[0]
        admin_key = Path(data["admin_key_file"]).read_text().strip()
        progress(f"loading {first.name}:{first.version} beside the running version")
        scoring_admin.load_beside(
            int(data["port"]),
            admin_key,
            first.name,
            {
                "model_dir": str(model_dir),
                "entry_script": str(entry) if entry else None,
                "version": str(first.version),
            },
            timeout=ready_timeout(),
            error=LocalTargetError,
        )
        progress(
            f"{record.name} now serves {', '.join(f'{m.name}:{m.version}' for m in spec.models)}"
        )
        data.update(model_dir=str(model_dir), entry_script=str(entry) if entry else None)
        return updated_record(record, spec, data)

    def status(self, record: ServiceRecord) -> ServiceStatus:
        data = record.target_data
        if "pid" not in data:
            return ServiceStatus(record.state, "no process recorded")
        log_path = Path(data["log_file"])
        if not _is_running(int(data["pid"]), str(data["admin_key_file"])):
            return ServiceStatus("failed", f"process {data['pid']} is not running", tail(log_path))
        if not _is_ready(int(data["port"])):
            return ServiceStatus(
                "failed", f"process {data['pid']} runs but is not ready", tail(log_path)
            )
        return ServiceStatus("healthy", f"pid {data['pid']} on port {data['port']}")

    def logs(self, record: ServiceRecord, follow: bool) -> Iterator[str]:
        data = record.target_data
        log_path = Path(data.get("log_file") or Path(data["workdir"]) / LOG_FILE)
        try:
            fh = log_path.open("r", errors="replace")
        except FileNotFoundError:
            return
        with fh:
            while True:
                line = fh.readline()
                if line:
                    yield line.rstrip("\n")
                    continue
                if not follow or not _is_running(int(data["pid"]), str(data["admin_key_file"])):
                    return
                time.sleep(0.2)

    def delete(self, record: ServiceRecord, progress: Progress) -> None:
        data = record.target_data
        if "pid" in data:
            progress(f"stopping the scoring server (pid {data['pid']})")
            _stop_process(int(data["pid"]), str(data["admin_key_file"]))
        elif data.get("workdir"):
            # A deploy killed before it recorded the pid: its server (own session,
            # so it outlived the CLI) is found by its admin key option on its command
            # line (the option too, so that e.g. a `tail` of that file is left alone).
            marker = f"--admin-key-file {Path(data['workdir']) / ADMIN_KEY_FILE}"
            for pid in _processes_with(marker):
                progress(f"stopping the scoring server left by an interrupted deploy (pid {pid})")
                _stop_process(pid, marker)
