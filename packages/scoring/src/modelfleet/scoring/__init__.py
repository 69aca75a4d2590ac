"""modelfleet.scoring: the scoring server and the model host embedded by the device agent."""

from .errors import ConfigError, InputError, ModelLoadError, ScoringError
from .host import LoadedModel, ModelHost, ModelSpec
from .server import ScoringServer
from .settings import ServerSettings, load_settings

__all__ = [
    "ConfigError",
    "InputError",
    "LoadedModel",
    "ModelHost",
    "ModelLoadError",
    "ModelSpec",
    "ScoringError",
    "ScoringServer",
    "ServerSettings",
    "load_settings",
]
