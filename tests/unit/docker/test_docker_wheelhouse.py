"""The inference config's dependencies as the Docker target's wheelhouse sees them."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfleet.deployer.errors import DeploymentError
from modelfleet.deployer.wheelhouse import user_requirements


def test_requirements_file_and_conda_pip_section_are_merged(tmp_path: Path) -> None:
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# comment\nrequests==2.32.3  # pinned\n\nscipy>=1.11\n")
    conda = tmp_path / "env.yml"
    conda.write_text(
        "name: project_environment\n"
        "dependencies:\n"
        "  - python=3.11\n"
        "  - pip:\n"
        "    - azureml-defaults\n"
        "    - inference-schema[numpy-support]\n"
    )
    assert user_requirements(reqs, conda) == (
        "requests==2.32.3\nscipy>=1.11\ninference-schema[numpy-support]\n"
    )


def test_no_dependencies_gives_empty_requirements() -> None:
    assert user_requirements(None, None) == ""


def test_unreadable_requirements_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match=r"cannot read requirements file .*missing.txt"):
        user_requirements(tmp_path / "missing.txt", None)


def test_broken_conda_file_is_named(tmp_path: Path) -> None:
    conda = tmp_path / "env.yml"
    conda.write_text("dependencies: [pip: {\n")
    with pytest.raises(DeploymentError, match=r"conda file .*env.yml is not valid YAML"):
        user_requirements(None, conda)
    conda.write_text("- just\n- a list\n")
    with pytest.raises(DeploymentError, match=r"expected a mapping with 'dependencies'"):
        user_requirements(None, conda)


def test_old_scoring_wheelhouses_are_pruned_beyond_the_newest(tmp_path: Path) -> None:
    import os
    import time

    from modelfleet.deployer.wheelhouse import prune_scoring_wheelhouses

    now = time.time()
    ages_h = {"scoring-a": 9, "scoring-b": 8, "scoring-c": 7, "scoring-d": 6, "scoring-young": 0.1}
    for name, age in ages_h.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.whl").write_bytes(b"wheel")
        os.utime(tmp_path / name, (now - age * 3600, now - age * 3600))
    (tmp_path / "reqs-1").mkdir()  # a user's requirements wheelhouse: never touched here
    os.utime(tmp_path / "reqs-1", (now - 99 * 3600, now - 99 * 3600))
    current = tmp_path / "scoring-current"
    current.mkdir()

    removed = prune_scoring_wheelhouses(tmp_path, keep=current)
    # current + the two newest others stay; of the rest only those an hour old go
    assert sorted(p.name for p in removed) == ["scoring-a", "scoring-b", "scoring-c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "reqs-1",
        "scoring-current",
        "scoring-d",
        "scoring-young",
    ]


def test_a_cached_scoring_wheelhouse_counts_as_used_when_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pruning goes by last use: a build reusing an old wheelhouse keeps it alive."""
    import os
    import time

    from modelfleet.deployer.wheelhouse import (
        find_workspace_root,
        prune_scoring_wheelhouses,
        scoring_wheelhouse,
        scoring_wheelhouse_key,
    )

    root = find_workspace_root()
    assert root is not None, "the tests run from the source checkout"
    monkeypatch.setenv("MODELFLEET_CACHE_DIR", str(tmp_path))
    houses = tmp_path / "wheelhouse"
    cached = houses / f"scoring-{scoring_wheelhouse_key(root)}"
    cached.mkdir(parents=True)
    (cached / "requirements.txt").write_text("")
    day_ago = time.time() - 24 * 3600
    others = []
    for n in range(3):  # three newer wheelhouses, made by builds of other sources
        other = houses / f"scoring-other{n}"
        other.mkdir()
        os.utime(other, (day_ago + 3600 * (n + 1),) * 2)
        others.append(other)
    os.utime(cached, (day_ago, day_ago))

    assert scoring_wheelhouse().path == cached  # reused, not rebuilt
    assert time.time() - cached.stat().st_mtime < 3600
    removed = prune_scoring_wheelhouses(houses, keep=houses / "scoring-new")
    assert cached.is_dir() and sorted(removed) == others[:2]


def _fake_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace root (uv.lock + packages/scoring) and a PATH without uv."""
    from modelfleet.deployer import wheelhouse

    root = tmp_path / "checkout"
    (root / "packages" / "scoring").mkdir(parents=True)
    (root / "uv.lock").write_text("version = 1\n")
    monkeypatch.setattr(wheelhouse, "find_workspace_root", lambda: root)
    monkeypatch.setenv("MODELFLEET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    return root


def test_without_uv_the_wheelhouse_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelfleet.deployer.wheelhouse import WheelhouseError, scoring_wheelhouse

    _fake_checkout(tmp_path, monkeypatch)
    with pytest.raises(WheelhouseError, match=r"uv is needed .*\./run\.sh quickstart installs it"):
        scoring_wheelhouse()


def test_uv_installed_by_run_sh_into_the_checkout_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a system Python that refuses pip installs, run.sh puts uv in .cache/bin."""
    from modelfleet.deployer.wheelhouse import WheelhouseError, scoring_wheelhouse

    root = _fake_checkout(tmp_path, monkeypatch)
    uv = root / ".cache" / "bin" / "uv"
    uv.parent.mkdir(parents=True)
    uv.write_text("#!/bin/sh\necho \"checkout uv called with $1\" >&2\nexit 3\n")
    uv.chmod(0o755)
    with pytest.raises(WheelhouseError, match="checkout uv called with export"):
        scoring_wheelhouse()
