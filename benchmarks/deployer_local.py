"""Deployer figures on the local target and the registry, each beside a same-run baseline.

1. Update under load: `modelfleet service update` (hot-swap through the admin
   endpoint) vs the baseline a user would do without it (delete, then deploy
   the new version on the same port). Figures: failed requests and the
   longest time with no successful answer.
2. Register: `Registry.register` of a large file vs the baseline of copying
   it and hashing it (`shutil.copyfile` + sha256), the least any store must do.
3. Download: the artifact server over HTTP vs reading the blob from disk.
4. Memory: peak RSS of a `register` process (streams the file) vs a process
   that imports the same modules and reads the file into memory.
5. Operation lock: taking and releasing a service's lock (owner pid + start
   time, a liveness check, two write transactions) vs the two plain state
   writes the manager made around an update before the lock existed.

    .venv/bin/python benchmarks/deployer_local.py [--clients 4] [--size-mb 256]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from update_load import Load

from modelfleet.deployer.config import load_deployment_config, load_inference_config
from modelfleet.deployer.registry import Registry
from modelfleet.deployer.registry.server import ArtifactServer
from modelfleet.deployer.samples import make_digits_onnx
from modelfleet.deployer.services import ServiceManager
from modelfleet.deployer.targets.base import ServiceRecord


def update_figures(home: Path, clients: int) -> None:
    registry = Registry(home)
    tmp = home / "samples"
    v1 = registry.register("digits", make_digits_onnx(tmp / "1" / "model.onnx")).model
    v2 = registry.register("digits", make_digits_onnx(tmp / "2" / "model.onnx", variant=4)).model
    manager = ServiceManager(registry)
    deployment, _ = load_deployment_config(None, overrides={"primaryKey": "bench-key-1"})
    inference = load_inference_config()

    started = time.monotonic()
    record = manager.deploy("bench", [v1.key], inference, deployment)
    deploy_s = time.monotonic() - started
    port = int(record.target_data["port"])
    url = str(record.scoring_uri)
    with Load(url, "bench-key-1", clients) as hot:
        time.sleep(1.0)
        t0 = time.monotonic()
        manager.update("bench", [v2.key])
        hot_s = time.monotonic() - t0
        time.sleep(1.0)  # let the service settle on the new version under load
    manager.delete("bench")

    deployment_same_port, _ = load_deployment_config(
        None, overrides={"primaryKey": "bench-key-1", "port": port}
    )
    manager.deploy("bench", [v1.key], inference, deployment_same_port)
    with Load(url, "bench-key-1", clients) as base:
        time.sleep(1.0)
        t0 = time.monotonic()
        manager.delete("bench")
        manager.deploy("bench", [v2.key], inference, deployment_same_port)
        base_s = time.monotonic() - t0
        time.sleep(1.0)
    manager.delete("bench")

    print(f"local deploy to ready: {deploy_s:.2f} s")
    print(f"update under load ({clients} clients)      ok   failed  longest gap  op time")
    print(f"  modelfleet hot-swap update     {hot.ok:7d}  {hot.failed:6d}  {hot.longest_gap * 1000:8.0f} ms  {hot_s:6.2f} s")
    print(f"  baseline delete + redeploy     {base.ok:7d}  {base.failed:6d}  {base.longest_gap * 1000:8.0f} ms  {base_s:6.2f} s")


def registry_figures(home: Path, size_mb: int) -> None:
    home.mkdir(parents=True, exist_ok=True)
    big = home / "big.bin"
    with big.open("wb") as fh:
        for _ in range(size_mb):
            fh.write(os.urandom(1 << 20))
    registry = Registry(home)

    t0 = time.monotonic()
    model = registry.register("big", big).model
    register_s = time.monotonic() - t0

    t0 = time.monotonic()
    shutil.copyfile(big, home / "copy.bin")
    digest = hashlib.sha256()
    with (home / "copy.bin").open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    copy_s = time.monotonic() - t0
    assert digest.hexdigest() == model.sha256

    with ArtifactServer(registry, token="bench") as server:
        t0 = time.monotonic()
        got = 0
        with httpx.stream("GET", f"{server.url}/v1/artifacts/{model.sha256}",
                          headers={"Authorization": "Bearer bench"}, timeout=60) as r:  # fmt: skip
            for chunk in r.iter_bytes(1 << 20):
                got += len(chunk)
        http_s = time.monotonic() - t0
    assert got == model.size
    t0 = time.monotonic()
    with registry.blobs.path(model.sha256).open("rb") as fh:
        while fh.read(1 << 20):
            pass
    read_s = time.monotonic() - t0

    print(f"register {size_mb} MiB                 {register_s:6.2f} s  ({size_mb / register_s:7.0f} MiB/s)")
    print(f"  baseline copy + sha256        {copy_s:6.2f} s  ({size_mb / copy_s:7.0f} MiB/s)")
    print(f"artifact server download        {http_s:6.2f} s  ({size_mb / http_s:7.0f} MiB/s)")
    print(f"  baseline read from disk       {read_s:6.2f} s  ({size_mb / read_s:7.0f} MiB/s)")


_PEAK = """
import sys
from pathlib import Path
from modelfleet.deployer.registry import Registry
if sys.argv[1] == "register":
    Registry(Path(sys.argv[3])).register("mem", Path(sys.argv[2]))
else:
    data = Path(sys.argv[2]).read_bytes()
# VmHWM, not ru_maxrss: the latter carries the forking parent's peak over exec.
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(int(hwm.split()[1]))
"""


def memory_figures(home: Path, size_mb: int) -> None:
    big = home / "big.bin"
    peak = {}
    for mode in ("register", "read"):
        out = subprocess.run(
            [sys.executable, "-c", _PEAK, mode, str(big), str(home / f"mem-{mode}")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        peak[mode] = int(out.stdout.strip()) / 1024
    print(f"peak RSS, register {size_mb} MiB        {peak['register']:6.0f} MiB")
    print(f"  baseline read into memory     {peak['read']:6.0f} MiB")


def lock_figures(home: Path, rounds: int = 200) -> None:
    registry = Registry(home)
    registry.reserve_service("bench", "local", {})
    registry.save_service(ServiceRecord("bench", "local", "healthy"))
    started = time.perf_counter()
    for _ in range(rounds):
        registry.begin_operation("bench", "update")
        registry.end_operation("bench", "healthy")
    lock_ms = (time.perf_counter() - started) / rounds * 1000
    started = time.perf_counter()
    for _ in range(rounds):
        registry.set_service_state("bench", "updating")
        registry.set_service_state("bench", "healthy")
    plain_ms = (time.perf_counter() - started) / rounds * 1000
    print(f"operation lock take + release   {lock_ms:6.2f} ms")
    print(f"  baseline two state writes     {plain_ms:6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--size-mb", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelfleet-bench-") as tmp:
        update_figures(Path(tmp) / "update", args.clients)
        registry_figures(Path(tmp) / "registry", args.size_mb)
        memory_figures(Path(tmp) / "registry", args.size_mb)
        lock_figures(Path(tmp) / "locks")


if __name__ == "__main__":
    main()
