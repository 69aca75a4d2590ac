"""The model version reference: what a device twin's desired state carries.

One shape for MQTT twins and IoT Hub twins; produced by the registry
(`modelfleet.deployer`) and consumed by the agent's model store.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

_SHA256 = re.compile(r"^[0-9a-f]{64}$")

ArtifactFormat = Literal["file", "tar"]


class ModelRefError(ValueError):
    """A model version reference is malformed; the message names the field."""


@dataclass(frozen=True)
class ModelVersionRef:
    """Where a model version's bytes are and how to check them.

    `format` is "file" for a single model file (saved under `filename`) or
    "tar" for a folder, packed as an uncompressed tar by the registry.
    `signature` is base64 Ed25519 over the 32 raw bytes of the sha256 digest.
    `entry_script` is a relative path inside the unpacked folder (None: no-code mode).
    """

    name: str
    version: int
    url: str
    sha256: str
    size: int
    format: ArtifactFormat = "file"
    filename: str = "model.onnx"
    framework: str = "onnx"
    signature: str | None = None
    key_id: str | None = None
    entry_script: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ModelRefError("model ref: 'name' must be a non-empty string")
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 1:
            raise ModelRefError("model ref: 'version' must be an integer >= 1")
        if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256):
            raise ModelRefError("model ref: 'sha256' must be 64 lowercase hex digits")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise ModelRefError("model ref: 'size' must be a non-negative integer")
        if self.format not in ("file", "tar"):
            raise ModelRefError("model ref: 'format' must be 'file' or 'tar'")
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://", "file://")):
            raise ModelRefError("model ref: 'url' must be an http(s):// or file:// URL")
        for name in ("filename", "framework"):
            if not isinstance(getattr(self, name), str):
                raise ModelRefError(f"model ref: {name!r} must be a string")
        for name in ("signature", "key_id", "entry_script"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ModelRefError(f"model ref: {name!r} must be a string")
        if "/" in self.filename or self.filename in ("", ".", ".."):
            raise ModelRefError("model ref: 'filename' must be a plain file name")
        if self.entry_script is not None:
            # the signature covers the artifact, not this field: code from elsewhere on the device must not run
            script = PurePosixPath(self.entry_script)
            if not self.entry_script or script.is_absolute() or ".." in script.parts:
                raise ModelRefError(
                    f"model ref: 'entry_script' must be a relative path inside the model folder, got {self.entry_script!r}"
                )

    @property
    def key(self) -> str:
        """`name:version`, as users write it."""
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any) -> ModelVersionRef:
        if not isinstance(data, dict):
            raise ModelRefError("model ref: expected an object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelRefError(f"model ref: unknown field {unknown[0]!r}")
        for required in ("name", "version", "url", "sha256", "size"):
            if required not in data:
                raise ModelRefError(f"model ref: missing field {required!r}")
        return cls(**data)
