"""Unpack a model archive so that nothing in it can land outside the target folder.

Python's tar "data" filter (PEP 706) does this, but it arrived in 3.11.4: Debian 12's
stock Python 3.11.2, common on devices, lacks `tarfile.data_filter` and the
`filter=` argument of `extractall`. There the same rules are applied here: no
absolute or `..` names, no links that point outside, no device or fifo members,
no set-uid/set-gid/sticky or group/other-write bits, no owners taken from the archive.
"""

from __future__ import annotations

import copy
import os
import stat
import tarfile
from pathlib import Path

_HAS_DATA_FILTER = hasattr(tarfile, "data_filter")


class UnsafeMemberError(ValueError):
    """An archive member that could escape the target folder or is not plain data."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"unsafe archive member {name!r}: {reason}")
        self.name = name
        self.reason = reason


def _escapes(path: str) -> bool:
    return path.startswith("/") or os.path.normpath(path).split(os.sep)[0] == ".."


def _checked(member: tarfile.TarInfo, target: str) -> tarfile.TarInfo:
    """The member as it may be extracted, or UnsafeMemberError."""
    if member.name.startswith("/") or ".." in Path(member.name).parts:
        raise UnsafeMemberError(member.name, "path leaves the folder")
    if _HAS_DATA_FILTER:
        try:
            return tarfile.data_filter(member, target)
        except tarfile.FilterError as exc:
            raise UnsafeMemberError(member.name, str(exc)) from None
    if member.ischr() or member.isblk() or member.isfifo() or not (
        member.isfile() or member.isdir() or member.issym() or member.islnk()
    ):
        raise UnsafeMemberError(member.name, "is a special file (device, fifo or unknown type)")
    if member.issym():
        link = os.path.join(os.path.dirname(member.name), member.linkname)
        if member.linkname.startswith("/") or _escapes(link):
            raise UnsafeMemberError(member.name, f"symlink to {member.linkname!r} points outside the folder")
    if member.islnk() and _escapes(member.linkname):
        raise UnsafeMemberError(member.name, f"hard link to {member.linkname!r} points outside the folder")
    clean = copy.copy(member)  # TarInfo.replace() is 3.11.4+ too
    clean.uid, clean.gid, clean.uname, clean.gname = os.getuid(), os.getgid(), "", ""
    if member.isfile() or member.islnk():
        clean.mode = (member.mode & 0o755) | stat.S_IRUSR | stat.S_IWUSR
    elif member.isdir():
        clean.mode = (member.mode & 0o755) | stat.S_IRWXU
    return clean


def safe_members(tar: tarfile.TarFile, target: Path) -> list[tarfile.TarInfo]:
    """Every member, checked (and cleaned where the data filter is missing); the first unsafe one raises."""
    where = str(target)
    return [_checked(member, where) for member in tar.getmembers()]


def safe_extractall(tar: tarfile.TarFile, target: Path) -> None:
    """`tar.extractall(target, filter="data")` on every Python 3.11; UnsafeMemberError before anything is written."""
    members = safe_members(tar, target)
    if _HAS_DATA_FILTER:
        tar.extractall(target, members=members, filter="data")
    else:
        tar.extractall(target, members=members)
