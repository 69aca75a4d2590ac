"""Safe tar extraction, with Python's data filter and with the rules applied by hand
where the running Python predates it (3.11.0-3.11.3, e.g. Debian 12's 3.11.2)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfleet.agent import safetar

# the by-hand rules always run; the data filter where this Python has it (3.11.4+)
_MODES = ["by_hand", *(["data_filter"] if hasattr(tarfile, "data_filter") else [])]


@pytest.fixture(params=_MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(safetar, "_HAS_DATA_FILTER", request.param == "data_filter")
    yield request.param


def _archive(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    info.uid, info.gid, info.uname, info.gname = 4242, 4242, "someone", "someone"
    return info


def _extract(archive: Path, target: Path) -> None:
    target.mkdir()
    with tarfile.open(archive) as tar:
        safetar.safe_extractall(tar, target)


def test_a_model_folder_unpacks_with_its_inside_links(mode: str, tmp_path: Path) -> None:
    archive = _archive(
        tmp_path,
        (_info("sub", tarfile.DIRTYPE, mode=0o755), None),
        (_info("sub/model.onnx", mode=0o6777), b"weights"),
        (_info("sub/latest", tarfile.SYMTYPE, "model.onnx"), None),
        (_info("copy.onnx", tarfile.LNKTYPE, "sub/model.onnx"), None),
    )
    out = tmp_path / "out"
    _extract(archive, out)
    model = out / "sub" / "model.onnx"
    assert model.read_bytes() == b"weights"
    assert (out / "sub" / "latest").read_bytes() == b"weights"
    assert (out / "copy.onnx").read_bytes() == b"weights"
    bits = stat.S_IMODE(model.stat().st_mode)
    assert not bits & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWGRP | stat.S_IWOTH), oct(bits)
    assert model.stat().st_uid == os.getuid()  # the archive's owner (4242) is not taken


@pytest.mark.parametrize(
    ("member", "name"),
    [
        (_info("../escape.txt"), "../escape.txt"),
        (_info("/etc/evil"), "/etc/evil"),
        (_info("a/../../escape.txt"), "a/../../escape.txt"),
        (_info("link", tarfile.SYMTYPE, "/etc/passwd"), "link"),
        (_info("sub/link", tarfile.SYMTYPE, "../../outside"), "sub/link"),
        (_info("hard", tarfile.LNKTYPE, "../outside"), "hard"),
        (_info("dev", tarfile.CHRTYPE), "dev"),
        (_info("blk", tarfile.BLKTYPE), "blk"),
        (_info("pipe", tarfile.FIFOTYPE), "pipe"),
    ],
)
def test_an_unsafe_member_is_refused_before_anything_is_written(
    mode: str, tmp_path: Path, member: tarfile.TarInfo, name: str
) -> None:
    archive = _archive(tmp_path, (_info("first.onnx"), b"ok"), (member, b"x" if member.isfile() else None))
    out = tmp_path / "out"
    with pytest.raises(safetar.UnsafeMemberError, match=f"unsafe archive member '{name}'"):
        _extract(archive, out)
    assert list(out.iterdir()) == []
    assert not (tmp_path / "escape.txt").exists()
