"""Azure ML's `extraDockerfileSteps`: a user's Dockerfile steps, checked and placed
in the service image.

The steps run after the scoring runtime and the user's requirements are
installed and before the image's own entry point. COPY and ADD sources are
relative to the inference config's source directory (as the file's author
sees it): the directory goes into the build context as `source/` and each
source path is rewritten to point there. The build has no network, so ADD
from a URL is refused up front instead of failing mid-build.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from modelfleet.deployer.config import read_text_file
from modelfleet.deployer.errors import DeploymentError

FIELD = "extraDockerfileSteps"
CONTEXT_DIR = "source"  # where the source directory sits in the service build context

# These would break the service image rather than extend it: FROM starts a new
# image without the scoring runtime, ENTRYPOINT/CMD would be replaced by the
# image's own entry point (which starts the scoring server) anyway.
_REFUSED = {
    "FROM": "it would start a new image without the scoring runtime; use baseImage instead",
    "ENTRYPOINT": "the image's entry point starts the scoring server and replaces it",
    "CMD": "the image's entry point starts the scoring server and replaces it",
}


class ExtraStepsError(DeploymentError):
    """The extraDockerfileSteps file cannot be used; the message names the line."""

    default_hint = f"fix the file named by {FIELD} in the inference config"


@dataclass(frozen=True)
class Step:
    line: int  # 1-based line of the file where the instruction starts
    written: str  # the instruction as the user wrote it (continuations joined)
    dockerfile: str  # the instruction as it goes into the generated Dockerfile


@dataclass(frozen=True)
class ExtraSteps:
    """The checked steps of one extraDockerfileSteps file."""

    path: Path
    steps: tuple[Step, ...]
    source_directory: Path | None  # set when a COPY/ADD reads from it (goes into the context)
    source_digest: str  # hash of that directory's content ("" when not used)

    @property
    def dockerfile(self) -> str:
        return "".join(f"{s.dockerfile}\n" for s in self.steps)

    @property
    def key(self) -> str:
        """Changes whenever the built image would: the steps or the files they copy."""
        h = hashlib.sha256()
        for part in ("extra-steps-v1", self.dockerfile, self.source_digest):
            h.update(part.encode() + b"\0")
        return h.hexdigest()


def load_extra_steps(
    path: Path, source_directory: Path | None, *, skip_names: frozenset[str] = frozenset()
) -> ExtraSteps:
    """Read and check `path`; raise ExtraStepsError naming the file and line."""
    text = read_text_file(path, FIELD, ExtraStepsError)
    steps: list[Step] = []
    reads_source = False
    for line_no, written in _instructions(text):
        keyword, _, rest = written.partition(" ")
        keyword = keyword.upper()
        where = f"{FIELD} {path.name} line {line_no}"
        if keyword in _REFUSED:
            raise ExtraStepsError(f"{where}: {keyword} is not allowed: {_REFUSED[keyword]}")
        rendered = written
        if keyword in ("COPY", "ADD"):
            rewritten = _rewrite_copy(keyword, rest.strip(), where, source_directory)
            if rewritten is not None:
                rendered = rewritten
                reads_source = True
        steps.append(Step(line_no, written, rendered))
    if not steps:
        raise ExtraStepsError(f"{FIELD} file {path} has no Dockerfile steps")
    digest = ""
    if reads_source:
        assert source_directory is not None  # _rewrite_copy refused it otherwise
        digest = tree_digest(source_directory, skip_names)
    return ExtraSteps(path, tuple(steps), source_directory if reads_source else None, digest)


def _instructions(text: str) -> list[tuple[int, str]]:
    """Logical Dockerfile lines: comments and blanks dropped, `\\` continuations joined."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and (not stripped or stripped.startswith("#")):
            continue  # Docker drops blank and comment lines inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        out.append((start, " ".join(p for p in pending if p)))
        pending = []
    if pending:
        out.append((start, " ".join(p for p in pending if p)))
    return out


def _rewrite_copy(keyword: str, args: str, where: str, source_directory: Path | None) -> str | None:
    """COPY/ADD with its sources moved under the context's source folder.

    None when the step copies from another build stage or image (`--from=`),
    which does not read the build context.
    """
    flags: list[str] = []
    rest = args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        flags.append(flag)
        rest = rest.strip()
    if any(f.startswith("--from=") for f in flags):
        return None
    json_form = rest.startswith("[")
    if json_form:
        try:
            parsed = json.loads(rest)
        except json.JSONDecodeError as exc:
            raise ExtraStepsError(
                f"{where}: {keyword} is not a valid JSON array: {exc.msg}"
            ) from exc
        if not isinstance(parsed, list) or not all(isinstance(p, str) for p in parsed):
            raise ExtraStepsError(f"{where}: {keyword} must be a JSON array of strings")
        parts: list[str] = parsed
    else:
        parts = rest.split()
    if len(parts) < 2:
        raise ExtraStepsError(f"{where}: {keyword} needs a source and a destination")
    if source_directory is None:
        raise ExtraStepsError(
            f"{where}: {keyword} reads files relative to the source directory, "
            "but the inference config has no sourceDirectory",
            hint="set sourceDirectory (or entryScript) in the inference config",
        )
    sources = [_source_in_context(src, keyword, where) for src in parts[:-1]]
    if json_form:
        return " ".join([keyword, *flags, json.dumps([*sources, parts[-1]])])
    return " ".join([keyword, *flags, *sources, parts[-1]])


def _source_in_context(src: str, keyword: str, where: str) -> str:
    if keyword == "ADD" and "://" in src:
        raise ExtraStepsError(
            f"{where}: ADD {src} needs the network, and images are built offline",
            hint="download the file into the source directory and COPY it",
        )
    norm = posixpath.normpath(src.lstrip("/")) if src.strip("/") else "."
    if norm == ".." or norm.startswith("../"):
        raise ExtraStepsError(f"{where}: {keyword} source {src} is outside the source directory")
    return CONTEXT_DIR if norm == "." else f"{CONTEXT_DIR}/{norm}"


def tree_digest(root: Path, skip_names: frozenset[str] = frozenset()) -> str:
    """Hash of a folder as a build context holds it: names, file content and
    executable bits, symlink targets (the tar keeps links as links), folders;
    entries under a name in `skip_names` left out, as the context leaves them."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel_path = path.relative_to(root)
        if any(part in skip_names for part in rel_path.parts):
            continue
        rel = str(rel_path).encode()
        if path.is_symlink():
            h.update(b"L" + rel + b"\0" + os.readlink(path).encode() + b"\0")
        elif path.is_file():
            h.update(b"F" + rel + b"\0" + bytes([path.stat().st_mode & 0o111 != 0]))
            with path.open("rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
        elif path.is_dir():
            h.update(b"D" + rel + b"\0")
    return h.hexdigest()
