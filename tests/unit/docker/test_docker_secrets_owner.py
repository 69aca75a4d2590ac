"""Rewriting a keys file keeps the owner a target gave it (the docker target's server user)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from modelfleet.deployer.targets.service_files import write_atomic


def test_new_file_is_private_to_its_writer(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "keys.json"
    write_atomic(path, "{}")
    st = path.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)


def test_rewrite_keeps_owner_and_mode(tmp_path: Path) -> None:
    # as root, like the docker target that gives the file to the server's uid
    path = tmp_path / "keys.json"
    write_atomic(path, '{"primary": "a"}')
    os.chown(path, 10001, 10001)
    path.chmod(0o640)
    write_atomic(path, '{"primary": "b"}')
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (10001, 10001, 0o640)
    assert path.read_text() == '{"primary": "b"}'
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"], "no temp file left"


def test_failed_rewrite_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    import pytest

    path = tmp_path / "keys.json"
    write_atomic(path, '{"primary": "a"}')
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, '{"primary": "\udc80"}')  # cannot be written as UTF-8
    assert path.read_text() == '{"primary": "a"}'
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"], "no temp file left"
