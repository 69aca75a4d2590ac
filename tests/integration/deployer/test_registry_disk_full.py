"""A register that runs out of disk says so, and leaves the registry as it was."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from servicekit import missing_service

from modelfleet.deployer.registry import Registry


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root, as CI has)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        missing_service(f"cannot mount a tmpfs (root needed): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_register_on_a_full_disk_names_the_disk_and_registers_nothing(
    small_disk: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from modelfleet.deployer.cli import app

    home = small_disk / "home"
    Registry(home).register("small", _write(tmp_path / "small.onnx", 64 * 1024))
    big = _write(tmp_path / "big.onnx", 3 * 1024 * 1024)

    result = CliRunner().invoke(
        app, ["model", "register", "-n", "big", "-p", str(big)],
        env={"MODELFLEET_HOME": str(home)}, catch_exceptions=False,
    )  # fmt: skip

    assert result.exit_code != 0
    assert "no space left to store big.onnx" in result.output
    assert "nothing was registered" in result.output
    assert "cannot read model file" not in result.output
    registry = Registry(home)
    assert [m.key for m in registry.list_models()] == ["small:1"]
    assert not list((home / "blobs").glob(".incoming-*"))  # the partial blob is gone
    # and the registry still works once there is room
    assert registry.register("small", _write(tmp_path / "small2.onnx", 1024)).model.version == 2


def _write(path: Path, size: int) -> Path:
    path.write_bytes(bytes(range(256)) * (size // 256))
    return path
