"""The embedded model registry: SQLite metadata, content-addressed blobs, HTTP artifact server."""

from modelfleet.deployer.registry.store import (
    ModelVersion,
    RegisterResult,
    Registry,
    guess_framework,
    parse_model_id,
)

__all__ = ["ModelVersion", "RegisterResult", "Registry", "guess_framework", "parse_model_id"]
