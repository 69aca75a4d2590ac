"""The deployer's error hierarchy: every user-facing failure is a DeployerError.

The CLI prints `error: <message>` plus `hint: <hint>` and exits non-zero; the
traceback is only shown with `--debug`.
"""

from __future__ import annotations


class DeployerError(Exception):
    """A failure the user can act on; `hint` says what to try next."""

    exit_code = 1
    default_hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class ConfigError(DeployerError):
    """An inference or deployment config (file or flags) is invalid; names the field."""

    exit_code = 2


class RegistryError(DeployerError):
    """The model registry refused an operation or its database is unusable."""


class ModelNotFoundError(RegistryError):
    """A model name or version that is not registered."""

    default_hint = "run `modelfleet model list` to see registered models"


class ModelInUseError(RegistryError):
    """A model version is used by a deployed service."""

    default_hint = "delete or update the service first, or pass --force"


class ArtifactError(RegistryError):
    """Model bytes are missing, unreadable, or do not match their digest."""


class SigningError(DeployerError):
    """A signing key is missing or not an Ed25519 private key."""


class ServiceNotFoundError(DeployerError):
    """A service name that is not deployed."""

    default_hint = "run `modelfleet service list` to see deployed services"


class ServiceExistsError(DeployerError):
    """A service name that is already deployed."""

    default_hint = "pick another name, `modelfleet service update` it, or delete it first"


class ServiceBusyError(DeployerError):
    """Another live modelfleet process is deploying, updating or deleting the service."""


class DeploymentError(DeployerError):
    """A deployment, update or deletion failed; the message carries the reason."""


class ServiceCallError(DeployerError):
    """Calling a deployed service failed (connection, auth, or a non-2xx answer)."""


class UnknownTargetError(DeployerError):
    """A target name with no implementation."""
