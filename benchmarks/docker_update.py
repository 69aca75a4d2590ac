"""Docker target figures: image build/caching, deploy-to-ready, and update under traffic.

The update is measured twice in the same run: modelfleet's hot-swap
(`DockerTarget.update`) and, as the baseline, what a user would do without it
(delete the container and deploy the new version on the same port). Both run
with the same client load; the figures are failed requests and the time the
service did not answer. With `--replicas N` the container runs N workers
(numReplicas); after the hot-swap, 60 requests over new connections show
which version and how many workers answer.

    .venv/bin/python benchmarks/docker_update.py [--clients 4] [--replicas 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from update_load import Load

from modelfleet.deployer.samples import make_digits_onnx
from modelfleet.deployer.targets.base import (
    DeploymentConfig,
    InferenceConfig,
    ModelBinding,
    ServiceRecord,
    ServiceSpec,
)
from modelfleet.deployer.targets.docker import DockerTarget


def model(path: Path, version: int) -> ModelBinding:
    return ModelBinding("digits", version, path, hashlib.sha256(path.read_bytes()).hexdigest())


def keyed(record: ServiceRecord) -> tuple[str, str]:
    assert record.scoring_uri
    keys = json.loads((Path(record.target_data["workdir"]) / "secrets" / "keys.json").read_text())
    return record.scoring_uri, str(keys["primary"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--replicas", type=int, default=1, help="numReplicas: workers in the container"
    )
    args = parser.parse_args()
    target = DockerTarget()
    quiet = lambda _line: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        v1 = model(make_digits_onnx(tmp / "v1" / "model.onnx", variant=1), 1)
        v2 = model(make_digits_onnx(tmp / "v2" / "model.onnx", variant=4), 2)
        deployment = DeploymentConfig(cpu_cores=1.0, memory_gb=0.5, replicas=args.replicas)
        spec = ServiceSpec("bench-docker", (v1,), InferenceConfig(), deployment, tmp / "svc")

        t = time.perf_counter()
        target.build(spec, quiet)  # builds what is missing: base, wheelhouse, runtime image
        first = time.perf_counter() - t
        t = time.perf_counter()
        target.build(spec, quiet)  # everything cached now: hashing inputs only
        warm = time.perf_counter() - t
        src = tmp / "src"
        src.mkdir()
        (src / "score.py").write_text(
            f"# {time.time_ns()}\ndef init():\n    pass\n\ndef run(d):\n    return d\n"
        )
        fresh = replace(
            spec, inference=InferenceConfig(source_directory=src, entry_script="score.py")
        )
        t = time.perf_counter()
        tag, _, built = target.build(fresh, quiet)
        fresh_build = time.perf_counter() - t
        assert built
        target.client.images.remove(tag)
        t = time.perf_counter()
        _, _, rebuilt = target.build(spec, quiet)
        cached_build = time.perf_counter() - t
        assert not rebuilt

        t = time.perf_counter()
        record = target.deploy(spec, quiet)
        deploy_s = time.perf_counter() - t
        url, key = keyed(record)

        # modelfleet: hot-swap in the running container
        with Load(url, key, args.clients) as load:
            time.sleep(1.0)
            t = time.perf_counter()
            record = target.update(record, replace(spec, models=(v2,)), quiet)
            swap_s = time.perf_counter() - t
            time.sleep(1.0)
        swap = (load.ok, load.failed, load.longest_gap)
        after = fresh_answers(url, key, 60)

        # docker stop of the running container (what delete does first): SIGTERM
        # reaches the server, which stops its workers; docker's grace is 10 s
        container = target.client.containers.get(record.target_data["container_id"])
        t = time.perf_counter()
        container.stop(timeout=10)
        stop_s = time.perf_counter() - t
        container.reload()
        stop_code = container.attrs["State"]["ExitCode"]
        container.start()
        deadline = time.monotonic() + 60
        while target.status(record).state != "healthy" and time.monotonic() < deadline:
            time.sleep(0.1)

        # baseline: delete + deploy the next version on the same port
        port = int(record.target_data["port"])
        # the same key too, or every request after the redeploy fails with 401
        v1_again = replace(
            spec, models=(v1,), deployment=replace(deployment, port=port, primary_key=key)
        )
        with Load(url, key, args.clients) as load:
            time.sleep(1.0)
            t = time.perf_counter()
            target.delete(record, quiet)
            record = target.deploy(v1_again, quiet)
            recreate_s = time.perf_counter() - t
            time.sleep(1.0)
        recreate = (load.ok, load.failed, load.longest_gap)
        target.delete(record, quiet)

    print(f"{'figure':44} {'value':>12}")
    print(f"{'first build in this run (what was missing) (s)':44} {first:12.2f}")
    print(f"{'build check, all images cached (s)':44} {warm:12.2f}")
    print(f"{'service image build, new content (s)':44} {fresh_build:12.2f}")
    print(f"{'service image, unchanged spec (s)':44} {cached_build:12.2f}")
    print(f"{'deploy to ready, image cached (s)':44} {deploy_s:12.2f}")
    print(f"{'docker stop (s; grace 10, exit code ' + str(stop_code) + ')':44} {stop_s:12.2f}")
    print()
    print(
        f"update under load ({args.clients} clients)   {'ok':>8} {'failed':>8} {'gap s':>8} {'took s':>8}"
    )
    print(f"{'modelfleet hot-swap':36} {swap[0]:8d} {swap[1]:8d} {swap[2]:8.2f} {swap_s:8.2f}")
    print(
        f"{'baseline: delete + deploy':36} {recreate[0]:8d} {recreate[1]:8d} {recreate[2]:8.2f} {recreate_s:8.2f}"
    )
    versions = [v for v, _ in after]
    print(
        f"after the hot-swap ({args.replicas} workers): {versions.count('2')} of {len(after)} new "
        f"connections answered by version 2, from {len({w for _, w in after})} workers"
    )


def fresh_answers(url: str, key: str, n: int) -> list[tuple[str, str]]:
    """(version, worker) of `n` requests, each over a new connection."""
    import httpx

    from modelfleet.deployer.samples import digits_rows

    seen = []
    for _ in range(n):
        with httpx.Client(timeout=10) as client:
            r = client.post(
                url, json={"data": digits_rows(1)}, headers={"Authorization": f"Bearer {key}"}
            )
        seen.append(
            (
                r.headers.get("x-model-version", "?"),
                r.headers.get("x-request-id", "?").split("-")[0],
            )
        )
    return seen


if __name__ == "__main__":
    main()
