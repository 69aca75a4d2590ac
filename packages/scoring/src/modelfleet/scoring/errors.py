"""The one error hierarchy of modelfleet-scoring: every error a user can cause names what was wrong."""

from __future__ import annotations


class ScoringError(Exception):
    """Base of every error raised by modelfleet.scoring."""


class ConfigError(ScoringError):
    """A setting (flag, env var or file) is invalid; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ModelLoadError(ScoringError):
    """A model version could not be loaded or warmed up; the active version keeps serving."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"model {stage} failed: {reason}")
        self.stage = stage
        self.reason = reason


class RequestError(ScoringError):
    """A request the server refuses; carries the HTTP status to answer with."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class InputError(RequestError):
    """The request body does not match the model's input schema (HTTP 400)."""

    status = 400


class ScriptError(ScoringError):
    """The user's run() raised; answered with HTTP 500 and the server keeps serving."""


def describe(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
