"""Docker target figure: what builds leave behind in the engine.

Deploys and deletes one service per variant, each of which needs a new
runtime image: `--change lockfile` (the default) adds one more package to the locked
dependencies, as a changed uv.lock does (every variant reinstalls them);
`--change requirements` varies the service's pip requirements. Then one
deploy whose extraDockerfileSteps fail. It prints `docker images -a` counts,
dangling images and the engine's layer size before and after.

    .venv/bin/python benchmarks/docker_cache.py [--change lockfile|requirements] [--variants 4]

Other builds on the same engine at the same time change the counts. Each
variant is a new runtime image on the default base, so the run pushes the
runtime and deps images the tests use out of the cache (rebuilt on next use).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from modelfleet.deployer import docker_images, wheelhouse
from modelfleet.deployer.samples import make_digits_onnx
from modelfleet.deployer.targets.base import (
    DeploymentConfig,
    InferenceConfig,
    ModelBinding,
    ServiceSpec,
)
from modelfleet.deployer.targets.docker import DockerTarget

VARIANTS = [
    "tabulate==0.9.0",
    "tabulate==0.8.10",
    "six==1.16.0",
    "six==1.17.0",
    "toolz==0.12.1",
    "toolz==1.0.0",
    "idna==3.7",
    "idna==3.10",
]


def lockfile_variant(real: wheelhouse.Wheelhouse, extra: str, dest: Path) -> wheelhouse.Wheelhouse:
    """The scoring wheelhouse plus one more locked package (`extra`): to the image
    builds, a new set of locked dependencies, as after a uv.lock change."""
    shutil.copytree(real.path, dest, copy_function=os.link)
    for wheel in wheelhouse.requirements_wheelhouse(extra + "\n").path.glob("*.whl"):
        os.link(wheel, dest / wheel.name)
    # a new file, not the hard link: the real wheelhouse is a shared, immutable cache
    (dest / "requirements.txt").unlink()
    (dest / "requirements.txt").write_text(real.requirements.read_text() + extra + "\n")
    return wheelhouse.Wheelhouse(dest, key=f"{real.key}-{uuid.uuid4().hex[:12]}")


def snapshot(client: Any) -> dict[str, Any]:
    every = client.api.images(all=True)
    dangling = client.api.images(filters={"dangling": True}, quiet=True)
    return {
        "ids": {i["Id"] for i in every},
        "all": len(every),
        # what `docker images -a | wc -l` prints: a row per tag (or one), and a header
        "rows": 1 + sum(max(1, len(i["RepoTags"] or [])) for i in every),
        "dangling": len(dangling),
        "layers_mb": client.df()["LayersSize"] / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=4, choices=range(1, len(VARIANTS) + 1))
    parser.add_argument("--change", choices=["lockfile", "requirements"], default="lockfile")
    args = parser.parse_args()
    target = DockerTarget()
    client = target.client
    quiet = lambda _line: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        onnx = make_digits_onnx(tmp / "m" / "model.onnx", variant=1)
        model = ModelBinding("digits", 1, onnx, hashlib.sha256(onnx.read_bytes()).hexdigest())
        deployment = DeploymentConfig(cpu_cores=1.0, memory_gb=0.5)
        # warm: base image and scoring wheelhouse, which every variant shares
        docker_images.prepare(client=client)
        before = snapshot(client)
        started = time.perf_counter()
        real_scoring = wheelhouse.scoring_wheelhouse
        for n, requirement in enumerate(VARIANTS[: args.variants]):
            inference = InferenceConfig()
            if args.change == "requirements":
                reqs = tmp / f"requirements-{n}.txt"
                reqs.write_text(requirement + "\n")
                inference = InferenceConfig(requirements_file=reqs)
                what = requirement
            else:
                locked = lockfile_variant(real_scoring(), requirement, tmp / f"lock-{n}")
                wheelhouse.scoring_wheelhouse = lambda _progress=quiet, w=locked: w  # type: ignore[misc]
                what = f"lockfile + {requirement}"
            spec = ServiceSpec(f"bench-cache-{n}", (model,), inference, deployment, tmp / f"s{n}")
            t = time.perf_counter()
            try:
                record = target.deploy(spec, quiet)
                target.delete(record, quiet)
            finally:
                wheelhouse.scoring_wheelhouse = real_scoring
            print(f"variant {what}: deployed and deleted in {time.perf_counter() - t:.0f} s")
        steps = tmp / "steps.docker"
        steps.write_text("ENV A=1\nRUN echo partial > /tmp/partial\nRUN false\n")
        failing = InferenceConfig(extra_dockerfile_steps=steps)
        spec = ServiceSpec("bench-cache-fail", (model,), failing, deployment, tmp / "fail")
        try:
            target.deploy(spec, quiet)
        except Exception as exc:  # the failure is the point
            print(f"failing extraDockerfileSteps: {str(exc).splitlines()[0][:100]}")
        elapsed = time.perf_counter() - started
        after = snapshot(client)
    left = after["ids"] - before["ids"]
    tagged = {
        t for i in client.api.images(all=True) if i["Id"] in left for t in i["RepoTags"] or []
    }
    print(f"\nscenario: {args.variants} {args.change} variants + 1 failing step, {elapsed:.0f} s")
    print(f"{'':24}{'before':>10}{'after':>10}")
    print(f"{'docker images -a | wc -l':24}{before['rows']:>10}{after['rows']:>10}")
    print(f"{'images (ids)':24}{before['all']:>10}{after['all']:>10}")
    print(f"{'dangling images':24}{before['dangling']:>10}{after['dangling']:>10}")
    print(f"{'layers (MB)':24}{before['layers_mb']:>10.0f}{after['layers_mb']:>10.0f}")
    print(f"new images left: {len(left)} (tags among them: {sorted(tagged) or 'none'})")


if __name__ == "__main__":
    main()
