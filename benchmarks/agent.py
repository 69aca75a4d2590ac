"""Device agent figures, each beside a baseline measured in the same run.

1. Rollout latency: publishing a new desired state (MQTT) -> the first /score
   answer from the new version, for ~1 MB and ~50 MB ONNX models (the digits
   model padded with an unused initializer). Baseline: the least any agent
   must do for that version, in one process with nothing else going on:
   download it from the same artifact server, sha256 it, open an
   onnxruntime session.
2. Idle RSS of the agent process with the digits model loaded, after its
   first telemetry intervals. Baseline: a bare Python process that imports
   onnxruntime, paho-mqtt and msgpack and holds the same model in a session.
   Also the agent's RSS after the 50 MB rollouts (is the old version freed?),
   and its idle CPU (1 s telemetry interval) beside the bare process's.

    .venv/bin/python benchmarks/agent.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt

from modelfleet.agent.modelref import ModelVersionRef
from modelfleet.agent.protocol import DesiredState, ReportedState, device_of
from modelfleet.deployer.registry import Registry
from modelfleet.deployer.registry.server import ArtifactServer
from modelfleet.deployer.samples import digits_rows, make_digits_onnx, pad_onnx

DEVICE = "bench-1"
ROWS = digits_rows(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise TimeoutError(what)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Controller:
    def __init__(self, port: int) -> None:
        self.reports: list[ReportedState] = []
        self.client = mqtt.Client(client_id="bench-controller")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"modelfleet/v1/{DEVICE}/reported", qos=1)
        self.client.loop_start()
        self.version = 0

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        device_of(msg.topic)
        self.reports.append(ReportedState.decode(msg.payload))

    def desire(self, ref: ModelVersionRef) -> int:
        self.version += 1
        self.client.publish(
            f"modelfleet/v1/{DEVICE}/desired", DesiredState(self.version, ref).encode(), qos=1, retain=True
        )
        return self.version

    def applied(self, version: int) -> bool:
        return any(r.version == version and r.status == "applied" for r in self.reports)


def first_answer_from(port: int, version: int, timeout: float) -> None:
    with httpx.Client(timeout=5) as client:
        def answered() -> bool:
            try:
                r = client.post(f"http://127.0.0.1:{port}/score", json={"data": ROWS})
            except httpx.HTTPError:
                return False
            return r.status_code == 200 and r.headers.get("x-model-version") == str(version)

        wait(answered, timeout, f"version {version} answering")


def baseline_apply(ref: ModelVersionRef, token: str, workdir: Path) -> float:
    """Download + sha256 + onnxruntime session, the floor for applying `ref`."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # the padding initializer is unused on purpose
    started = time.perf_counter()
    request = urllib.request.Request(ref.url, headers={"Authorization": f"Bearer {token}"})
    path = workdir / "baseline.onnx"
    digest = hashlib.sha256()
    with urllib.request.urlopen(request) as response, open(path, "wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    assert digest.hexdigest() == ref.sha256
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: np.asarray(ROWS, dtype=np.float32)})
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


BASELINE_RSS = """
import sys, time
import onnxruntime as ort, paho.mqtt.client, msgpack, numpy as np
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
s.run(None, {s.get_inputs()[0].name: np.zeros((1, 64), dtype=np.float32)})
print("ready", flush=True)
time.sleep(60)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelfleet-bench-agent-"))
    procs: list[subprocess.Popen[bytes]] = []
    server = None
    try:
        broker_port = free_port()
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {broker_port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n")
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        procs.append(subprocess.Popen([mosquitto, "-c", str(conf)], stderr=subprocess.DEVNULL))
        wait(lambda: socket.socket().connect_ex(("127.0.0.1", broker_port)) == 0, 10, "mosquitto")

        registry = Registry(work / "registry")
        server = ArtifactServer(registry, token="bench-token").start()
        digits = make_digits_onnx(work / "digits" / "model.onnx")

        def register(path: Path) -> ModelVersionRef:
            return registry.model_ref(registry.register("bench", path).model, server.url)

        base_ref = register(digits)
        sized: dict[str, list[ModelVersionRef]] = {}
        for label, size in (("1 MB", 1 << 20), ("50 MB", 50 << 20)):
            sized[label] = [
                register(pad_onnx(digits, work / f"{label}-{i}" / "model.onnx", size, seed=i))
                for i in range(args.repeat)
            ]

        config = work / "agent.toml"
        config.write_text(
            f'[device]\nid = "{DEVICE}"\n[broker]\nport = {broker_port}\n'
            f'[store]\ndir = "{work / "agent"}"\nreserve_mb = 0\ntoken = "bench-token"\n'
            f'[scoring]\nport = 0\n[telemetry]\ninterval_s = 1\n[log]\nlevel = "WARNING"\n'
        )
        controller = Controller(broker_port)
        agent_log = open(work / "agent.log", "wb")  # noqa: SIM115 - closed with the process
        agent = subprocess.Popen(
            [sys.executable, "-m", "modelfleet.agent", "run", "--config", str(config)],
            stdout=agent_log, stderr=subprocess.STDOUT,
        )
        procs.append(agent)
        version = controller.desire(base_ref)
        wait(lambda: controller.applied(version), 60, "digits applied")
        state = json.loads((work / "agent" / "state.json").read_text())
        assert state["active"]["sha256"] == base_ref.sha256
        port = _scoring_port(agent.pid)
        first_answer_from(port, base_ref.version, 10)

        # idle RSS with the digits model loaded, after a few telemetry intervals
        time.sleep(3)
        agent_rss = rss_mib(agent.pid)
        base_proc = subprocess.Popen(
            [sys.executable, "-c", BASELINE_RSS, str(digits)], stdout=subprocess.PIPE
        )
        procs.append(base_proc)
        assert base_proc.stdout is not None
        base_proc.stdout.readline()
        base_rss = rss_mib(base_proc.pid)

        cpu0, base_cpu0, t0 = cpu_seconds(agent.pid), cpu_seconds(base_proc.pid), time.monotonic()
        time.sleep(5)
        span = time.monotonic() - t0
        agent_cpu = 100 * (cpu_seconds(agent.pid) - cpu0) / span
        base_cpu = 100 * (cpu_seconds(base_proc.pid) - base_cpu0) / span

        print(f"{'figure':44} {'agent':>10} {'baseline':>10}")
        print(f"{'idle RSS, digits model loaded (MiB)':44} {agent_rss:10.1f} {base_rss:10.1f}")
        print(f"{'idle CPU, 1 s telemetry interval (% core)':44} {agent_cpu:10.2f} {base_cpu:10.2f}")
        for label, refs in sized.items():
            agent_times, base_times = [], []
            for ref in refs:
                started = time.perf_counter()
                version = controller.desire(ref)
                first_answer_from(port, ref.version, 120)
                agent_times.append(time.perf_counter() - started)
                wait(lambda v=version: controller.applied(v), 30, "applied report")  # type: ignore[misc]
                base_times.append(baseline_apply(ref, "bench-token", work))
            print(
                f"{'desired -> first answer, ' + label + ' (s, median)':44} "
                f"{statistics.median(agent_times):10.3f} {statistics.median(base_times):10.3f}"
            )
        time.sleep(2)
        print(f"{'RSS after the 50 MB rollouts (MiB)':44} {rss_mib(agent.pid):10.1f} {'-':>10}")
        print(f"(repeat={args.repeat}; baseline = download + sha256 + onnxruntime session in one process)")
    finally:
        if server is not None:
            server.stop()
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def _scoring_port(pid: int) -> int:
    """The agent's scoring port: its one listening TCP socket besides nothing else (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        if str(target).startswith("socket:["):
            inodes.add(str(target)[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[3] == "0A" and parts[9] in inodes:  # LISTEN
            return int(parts[1].split(":")[1], 16)
    raise RuntimeError("the agent is not listening")


if __name__ == "__main__":
    main()
